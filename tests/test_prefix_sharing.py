"""Prefix sharing: one block per record ([prompt][resp_1][resp_2]...), packed into masked rows or
laid end to end in one flat row with span attention, gives the same rewards, imitation loss,
training loss and gradients as one row per response, with fewer tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rmkit.attention import SPAN_ATTENTION
from rmkit.data.collate import (
    DEFAULT_ATTENTION_SCALE,
    IGNORE_INDEX,
    LAYOUTS,
    EncodedRecord,
    bin_pack,
    collate,
    collate_packed,
    encode_record,
    packing_pays,
)
from rmkit.data.records import Record
from rmkit.model import POOLINGS, RewardModel
from rmkit.recipe import Recipe
from rmkit.score import score_shard
from rmkit.train.loop import micro_batch_loss

X = IGNORE_INDEX


def example() -> list[EncodedRecord]:
    return [
        EncodedRecord([5, 6], [[7], [8, 9]], (1.0, 0.0)),
        EncodedRecord([5], [[3], [4, 4], [2]], (2.0, 1.0, 1.0)),
    ]


def test_packed_layout_exact_right_padding() -> None:
    b = collate(example(), pad_id=0, padding_side="right", lm_target="response", layout="packed")
    assert b.packed and b.n_rows == 2 and b.n_responses == 5
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 3, 4, 4, 2]]  # equal lengths: no padding
    assert b.attention_mask.tolist() == [[1] * 5, [1] * 5]
    # response r's tokens carry r, record i's prompt -2 - i
    assert b.segment_ids.tolist() == [[-2, -2, 0, 1, 1], [-3, 2, 3, 3, 4]]
    # positions restart after the prompt for every response
    assert b.position_ids.tolist() == [[0, 1, 2, 2, 3], [0, 1, 1, 2, 1]]
    # shifted targets: the prompt's last position predicts the preferred response's first token
    assert b.lm_grid().tolist() == [[X, 7, X, X, X], [3, X, X, X, X]]
    assert b.response_end.tolist() == [[0, 2], [0, 4], [1, 1], [1, 3], [1, 4]]
    assert b.record_index.tolist() == [0, 0, 1, 1, 1]
    assert b.better.tolist() == [0, 2, 2] and b.worse.tolist() == [1, 3, 4]  # same as the unshared rows
    assert (b.n_tokens, b.n_truncated, b.n_lm_targets) == (10, 0, 2)
    assert collate(example(), 0, lm_target="response").n_tokens == 14  # 4 prompt tokens saved


def test_packed_layout_exact_left_padding_whole_target() -> None:
    recs = [EncodedRecord([5, 6, 7], [[8, 9], [1]], (0.0, 1.0)), EncodedRecord([5], [[3], [4]], (1.0, 1.0))]
    b = collate_packed(recs, pad_id=0, padding_side="left", lm_target="whole")
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 1], [0, 0, 0, 5, 3, 4]]
    assert b.segment_ids.tolist() == [[-2, -2, -2, 0, 0, 1], [-1, -1, -1, -3, 2, 3]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 0, 0, 0, 1, 1]]
    # record 0 prefers response 1 ([1]): prompt targets 6, 7 then 1 from the prompt's end;
    # record 1 ties at the top: no targets at all
    assert b.lm_grid().tolist() == [[6, 7, 1, X, X, X], [X] * 6]
    assert b.response_end.tolist() == [[0, 4], [0, 5], [1, 4], [1, 5]]
    assert b.better.tolist() == [1] and b.worse.tolist() == [0]
    unshared = collate(recs, 0, "left", "whole")
    assert b.n_lm_targets == unshared.n_lm_targets == 3
    moved = b.to("cpu")
    assert torch.equal(moved.segment_ids, b.segment_ids) and torch.equal(moved.response_end, b.response_end)


@pytest.mark.parametrize("lm_target,expected", [("response", 2), ("whole", 3)])
def test_first_token_is_never_a_target(lm_target, expected) -> None:
    """Nothing predicts a row's first token: not under right padding, not under left padding
    (where a pad precedes it), not packed. whole: 6, 7 | 4; response: 7 | 4."""
    recs = [EncodedRecord([5, 6], [[7], [8, 9, 9]], (1.0, 0.0)), EncodedRecord([], [[3, 4], [4]], (1.0, 0.0))]
    counts = {(side, layout): collate(recs, 0, side, lm_target, layout=layout).n_lm_targets
              for side in ("left", "right") for layout in LAYOUTS}
    assert set(counts.values()) == {expected}, counts


def test_short_records_share_a_row() -> None:
    """Blocks are bin-packed into rows no longer than the longest block: B and C share row 1."""
    a = EncodedRecord([5, 6, 7], [[8, 9], [1]], (0.0, 1.0))  # 6 tokens
    b_ = EncodedRecord([5], [[3], [4]], (1.0, 0.0))  # 3 tokens
    c = EncodedRecord([6], [[7], [8]], (0.0, 1.0))  # 3 tokens
    b = collate([b_, a, c], pad_id=0, lm_target="response", layout="packed")
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 1], [5, 3, 4, 6, 7, 8]]
    assert b.segment_ids.tolist() == [[-3, -3, -3, 2, 2, 3], [-2, 0, 1, -4, 4, 5]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 0, 1, 1]]
    assert b.lm_grid().tolist() == [[X, X, 1, X, X, X], [3, X, X, 8, X, X]]
    assert b.response_end.tolist() == [[1, 1], [1, 2], [0, 4], [0, 5], [1, 4], [1, 5]]
    assert b.record_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert list(zip(b.better.tolist(), b.worse.tolist())) == [(0, 1), (3, 2), (5, 4)]
    assert (b.n_rows, b.n_tokens, b.attention_mask.sum().item()) == (2, 12, 12)
    assert bin_pack([6, 3, 3, 2, 5], 6) == [[0], [4], [1, 2], [3]]


def test_preferred_rows_are_never_packed() -> None:
    b = collate(example(), 0, lm_target="whole", rows="preferred", layout="packed")
    assert not b.packed and b.input_ids.tolist() == [[5, 6, 7], [5, 3, 0]]


def test_packing_pays_cost_model() -> None:
    """cost = rows * L * (1 + L / scale). A long shared prompt pays, long responses do not."""
    long_prompt = [EncodedRecord([1] * 90, [[2] * 10, [3] * 10], (1.0, 0.0))]
    # packed 1 x 110 * (1 + 110/100) = 231  <  unshared 2 x 100 * (1 + 100/100) = 400
    assert packing_pays(long_prompt, attention_scale=100.0)
    long_responses = [EncodedRecord([1] * 4, [[k] * 100 for k in range(2, 7)], (1.0, 0, 0, 0, 0))]
    # packed 504 * (1 + 504/100) = 3044  >  unshared 5 x 104 * (1 + 104/100) = 1061
    assert not packing_pays(long_responses, attention_scale=100.0)
    # with negligible attention cost packing never adds tokens: 504 < 520
    assert packing_pays(long_responses, attention_scale=1e9)
    # the default scale (what scoring and training use for a model that does not say):
    # 504 * (1 + 504/4096) = 566.0 > 520 * (1 + 104/4096) = 533.2
    assert DEFAULT_ATTENTION_SCALE == 4096.0 and not packing_pays(long_responses)
    assert packing_pays(long_responses, attention_scale=1e5)  # 506.5 < 520.5
    assert not packing_pays([], 100.0)


# ---- the model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> RewardModel:
    return RewardModel.from_pretrained(tiny_model_dir).eval()


def mixed_records() -> list[Record]:
    """2, 3 and 5 responses; a long prompt that gets truncated; an empty response."""
    return [
        Record("User: how do I bake bread? Assistant:", (" Mix flour, water and yeast, then bake.", " No idea."),
               (1.0, 0.0)),
        Record("User: what is a reward model? Assistant:", (" A model that scores responses.", " A fox.", ""),
               (2.0, 1.0, 0.0)),
        Record("User: tell a story about a fox and a dog and bread and a reward model. " * 3 + "Assistant:",
               (" A fox met a dog.", " Once upon a time.", " No.", " The end.", " Bread."), (4.0, 3.0, 2.0, 1.0, 0.0)),
    ]


def encoded(tok, pooling: str = "last", max_length: int = 40) -> list[EncodedRecord]:
    return [encode_record(r, tok, max_length=max_length, append_eos=pooling == "eos") for r in mixed_records()]


def separate_rewards(model: RewardModel, encs: list[EncodedRecord]) -> torch.Tensor:
    """One unpadded forward per response: the reference the packed rewards must equal."""
    out = []
    for e in encs:
        for resp in e.response_ids:
            ids = torch.tensor([e.prompt_ids + resp])
            out.append(model(ids, torch.ones_like(ids)).rewards[0])
    return torch.stack(out)


@pytest.mark.parametrize("layout,padding_side", [("packed", "left"), ("packed", "right"), ("flat", "right")])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_packed_rewards_equal_separate_forwards(model, tiny_tokenizer, pooling, layout, padding_side) -> None:
    encs = encoded(tiny_tokenizer, pooling)
    assert [len(e.response_ids) for e in encs] == [2, 3, 5]
    assert encs[2].truncated and not encs[0].truncated and encs[1].response_ids[2] == ([1] if pooling == "eos" else [])
    b = collate(encs, tiny_tokenizer.pad_token_id, padding_side, layout=layout)
    assert b.layout == layout
    assert b.n_tokens < collate(encs, tiny_tokenizer.pad_token_id, padding_side).n_tokens
    model.pooling = pooling
    try:
        with torch.no_grad():
            packed = model(**b.model_inputs()).rewards
            expected = separate_rewards(model, encs)
    finally:
        model.pooling = "last"
    assert packed.shape == (10,) and packed.dtype == torch.float32
    assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    assert expected.unique().numel() >= 9  # rewards differ (the empty response equals its prompt only)


@pytest.mark.parametrize("layout", ["packed", "flat"])
def test_empty_prompt_record(model, tiny_tokenizer, layout) -> None:
    """Left truncation can leave no prompt: responses then share nothing but still never mix."""
    enc = EncodedRecord([], [[40, 41, 42], [43, 44]], (1.0, 0.0))
    encs = [enc, encoded(tiny_tokenizer)[0]]
    b = collate(encs, tiny_tokenizer.pad_token_id, layout=layout)
    row = int(b.response_end[0, 0])
    assert b.segment_ids[row, :5].tolist() == [0, 0, 0, 1, 1] and b.position_ids[row, :5].tolist() == [0, 1, 2, 0, 1]
    if layout == "flat":  # no prompt: the second response is a span of its own with no prefix
        assert b.spans[:2].tolist() == [[0, 3, 0, 0], [3, 5, 0, 0]]
    with torch.no_grad():
        assert_close(model(**b.model_inputs()).rewards, separate_rewards(model, encs), atol=1e-5, rtol=1e-5)


def reference_mask(seg: torch.Tensor, record_index: torch.Tensor) -> torch.Tensor:
    """The rule, position by position: causal, and the key is in the query's own segment or is
    the prompt of the query's record; a padding query sees itself."""
    b, n = seg.shape
    out = torch.zeros(b, n, n, dtype=torch.bool)
    for r in range(b):
        for q in range(n):
            sq = int(seg[r, q])
            owner = -2 - int(record_index[sq]) if sq >= 0 else sq
            for k in range(q + 1):
                sk = int(seg[r, k])
                out[r, q, k] = (sk != -1 and (sk == sq or sk == owner)) or k == q
    return out


def assert_edits_stay_in_their_record(model: RewardModel, enc: list[EncodedRecord], pad: int, layout: str,
                                      base: torch.Tensor) -> None:
    """Editing response 1 of record 0 (same length, so the layout is unchanged) changes its own
    reward only: response 2, which follows it in the row, and every other record keep theirs;
    editing record 0's prompt (its last token) reaches both its responses and nothing else."""
    def rewards_with(first: list[int], prompt: list[int]) -> torch.Tensor:
        edited = EncodedRecord(prompt, [first, *enc[0].response_ids[1:]], enc[0].scores)
        b = collate([edited, *enc[1:]], pad, layout=layout)
        assert b.layout == layout
        with torch.no_grad():
            return model(**b.model_inputs()).rewards

    first, prompt = enc[0].response_ids[0], enc[0].prompt_ids
    assert torch.equal(rewards_with(first, prompt), base)
    other = rewards_with([50 + (t % 7) for t in first], prompt)
    assert not torch.allclose(other[0], base[0])
    assert_close(other[1:], base[1:], atol=1e-6, rtol=1e-6)
    other = rewards_with(first, prompt[:-1] + [prompt[-1] % 50 + 60])
    assert not torch.allclose(other[0], base[0]) and not torch.allclose(other[1], base[1])
    assert_close(other[2:], base[2:], atol=1e-6, rtol=1e-6)


def test_sdpa_gets_the_mask_and_honours_it(model, tiny_tokenizer, tiny_model_dir, monkeypatch) -> None:
    enc = encoded(tiny_tokenizer) + [EncodedRecord([2, 40], [[41], [42, 43]], (1.0, 0.0))]
    b = collate(enc, tiny_tokenizer.pad_token_id, layout="packed")
    assert b.n_rows == 3  # the short record shares a row: the mask must keep records apart too
    seen: list[torch.Tensor] = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        base = model(**b.model_inputs()).rewards
    monkeypatch.undo()
    assert model.config._attn_implementation == SPAN_ATTENTION  # sdpa itself when no spans are given
    assert len(seen) == 2  # one SDPA call per layer, each with our boolean 4-D mask
    for m in seen:
        assert m.dtype == torch.bool and m.shape == (3, 1, b.input_ids.shape[1], b.input_ids.shape[1])
    assert torch.equal(seen[0][:, 0], reference_mask(b.segment_ids, b.record_index))
    assert not seen[0].all()  # something is masked: the responses of a record do not see each other

    # What the mask must prevent: a later response attending to an earlier one in its row.
    assert_edits_stay_in_their_record(model, enc, tiny_tokenizer.pad_token_id, "packed", base)

    eager = RewardModel(__import__("transformers").AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), attn_implementation="eager")).eval()
    with torch.no_grad():
        assert_close(eager(**b.model_inputs()).rewards, base, atol=1e-5, rtol=1e-5)


def count_lm_head_calls(model: RewardModel) -> list[int]:
    calls = [0]
    model.lm_head.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("chunk", [1, 3, 100_000])
@pytest.mark.parametrize("lm_target", ["response", "whole"])
def test_packed_imitation_equals_unshared(tiny_model_dir, tiny_tokenizer, lm_target, chunk) -> None:
    encs = encoded(tiny_tokenizer)
    grads = []
    results = []
    for layout in LAYOUTS:
        rm = RewardModel.from_pretrained(tiny_model_dir)
        calls = count_lm_head_calls(rm)
        b = collate(encs, tiny_tokenizer.pad_token_id, "left", lm_target, layout=layout)
        out = rm(**b.model_inputs(with_lm=True), lm_chunk_size=chunk)
        assert out.lm_tokens == b.n_lm_targets
        assert calls[0] == -(-out.lm_tokens // chunk)  # lm_head only on target positions, in chunks
        out.lm_loss.backward()
        results.append(out)
        grads.append({n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None})
    plain = results[0]
    # record 2 prefers response 0 (7 targets with whole: prompt tokens too); record 1 response 0
    assert plain.lm_tokens > 0 and "score.weight" not in grads[0]
    for shared, shared_grads in zip(results[1:], grads[1:]):
        assert shared.lm_tokens == plain.lm_tokens
        assert_close(shared.lm_loss, plain.lm_loss, atol=1e-4, rtol=1e-5)
        assert shared_grads.keys() == grads[0].keys()
        for name in grads[0]:
            assert_close(shared_grads[name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def recipe(imitation_weight: float, target: str = "response") -> Recipe:
    return Recipe.model_validate({
        "stage": "crft", "domain": "business", "model": {"path": "unused"},
        "data": {"train": [{"path": "unused"}]},
        "loss": {"imitation_weight": imitation_weight, "imitation_target": target, "lm_chunk_size": 4},
        "train": {"lr": 1e-3, "global_batch": 3},
    })


@pytest.mark.parametrize("imitation_weight,target", [(0.0, "response"), (0.5, "whole")])
def test_train_step_loss_and_gradients_match(tiny_model_dir, tiny_tokenizer, imitation_weight, target) -> None:
    """The training loss of one micro-batch, in both layouts: same loss, accuracy, gradient norm."""
    r = recipe(imitation_weight, target)
    encs = encoded(tiny_tokenizer)
    lm = "none" if imitation_weight == 0 else target
    seen = []
    for layout in LAYOUTS:
        rm = RewardModel.from_pretrained(tiny_model_dir)
        b = collate(encs, tiny_tokenizer.pad_token_id, "right", lm, layout=layout)
        loss, rank_l, im_l, out = micro_batch_loss(rm, b, r, lm != "none", torch.device("cpu"))
        loss.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in rm.parameters() if p.grad is not None))
        correct = int((out.rewards[b.better] > out.rewards[b.worse]).sum())
        seen.append((loss.detach(), rank_l.detach(), im_l.detach(), norm, correct, b.better.numel()))
    (l0, r0, i0, n0, c0, p0) = seen[0]
    assert p0 == 1 + 3 + 10  # strict pairs of 2, 3 and 5 distinct scores
    assert (i0.item() > 0) == (imitation_weight > 0)
    for l1, r1, i1, n1, c1, p1 in seen[1:]:
        assert p1 == p0 and c1 == c0
        assert_close(l1, l0, atol=1e-5, rtol=1e-5)
        assert_close(r1, r0, atol=1e-5, rtol=1e-5)
        assert_close(i1, i0, atol=1e-5, rtol=1e-5)
        assert_close(n1, n0, atol=1e-6, rtol=1e-5)


def test_score_shard_same_results_and_forward_calls(model, tiny_tokenizer) -> None:
    # 9 records with 9 distinct prompts (records sharing a prompt would be scored as one unit)
    encs = [EncodedRecord(e.prompt_ids[:1] + [20 + k] + e.prompt_ids[1:], e.response_ids, e.scores)
            for k in range(3) for e in encoded(tiny_tokenizer)]
    calls = []
    hook = model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append("flat" if kwargs.get("spans") is not None else
                                                  "packed" if kwargs.get("segment_ids") is not None else "rows"),
        with_kwargs=True)
    try:
        results = {}
        for sharing in (False, True):
            for rank in (0, 1):
                calls.clear()
                results[sharing, rank] = score_shard(model, encs, 2, tiny_tokenizer.pad_token_id, "right", rank, 2,
                                                     torch.device("cpu"), prefix_sharing=sharing)
                assert len(calls) == 3  # ceil(5 batches / 2 ranks) on both ranks, both layouts
                assert all(c == ("flat" if sharing else "rows") for c in calls)  # on a CPU: flat
    finally:
        hook.remove()
    for rank in (0, 1):
        plain, shared = dict(results[False, rank]), dict(results[True, rank])
        assert plain.keys() == shared.keys()
        for i in plain:
            assert_close(torch.tensor(shared[i]), torch.tensor(plain[i]), atol=1e-5, rtol=1e-5)
    assert sorted(i for r in (0, 1) for i, _ in results[True, r]) == list(range(9))


# ---- the flat layout: one unpadded row, attention per span ----------------------------------


def test_flat_layout_exact() -> None:
    """Every block end to end in one row, whatever the padding side; spans per response."""
    for side in ("left", "right"):
        b = collate(example(), pad_id=0, padding_side=side, lm_target="response", layout="flat")
        assert b.layout == "flat" and b.n_rows == 1 and b.n_responses == 5
        assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 5, 3, 4, 4, 2]]
        assert b.segment_ids.tolist() == [[-2, -2, 0, 1, 1, -3, 2, 3, 3, 4]]
        assert b.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1, 1, 2, 1]]
        # (q0, q1, p0, p1): the prompt and first response causal, later responses see their prompt
        assert b.spans.tolist() == [[0, 3, 0, 0], [3, 5, 0, 2], [5, 7, 5, 5], [7, 9, 5, 6], [9, 10, 5, 6]]
        assert b.response_end.tolist() == [[0, 2], [0, 4], [0, 6], [0, 8], [0, 9]]
        assert b.lm_grid().tolist() == [[X, 7, X, X, X, 3, X, X, X, X]]
        assert b.better.tolist() == [0, 2, 2] and b.worse.tolist() == [1, 3, 4]
        assert (b.n_tokens, b.attention_mask.sum().item()) == (10, 10)
    inputs = b.model_inputs("meta")
    assert inputs["spans"] is b.spans and inputs["input_ids"].device.type == "meta"  # spans stay on the CPU


def test_choose_layout_rule() -> None:
    """Flat on a CPU whose model takes spans; elsewhere packed or rows by cost; rows without sharing."""
    from rmkit.data.collate import choose_layout

    long_prompt = [EncodedRecord([1] * 90, [[2] * 10, [3] * 10], (1.0, 0.0))]
    long_responses = [EncodedRecord([1] * 4, [[k] * 100 for k in range(2, 7)], (1.0, 0, 0, 0, 0))]
    for encs in (long_prompt, long_responses):
        assert choose_layout(encs, True, True, "cpu", 100.0) == "flat"
        assert choose_layout(encs, False, True, "cpu", 100.0) == "rows"
    assert choose_layout(long_prompt, True, True, "cuda", 100.0) == "packed"
    assert choose_layout(long_responses, True, True, "cuda", 100.0) == "rows"
    assert choose_layout(long_prompt, True, False, "cpu", 100.0) == "packed"
    assert choose_layout([], True, True, "cpu") == "rows"


def test_span_attention_calls_and_isolation(model, tiny_tokenizer, monkeypatch) -> None:
    """One SDPA call per span and layer, each on its span's queries and keys only (no [L, L]
    mask anywhere), with the model's key-value heads as they are (GQA in the kernel, no copies per
    query head); editing a response changes its own reward only, editing a prompt its record's."""
    enc = encoded(tiny_tokenizer) + [EncodedRecord([2, 40], [[41], [42, 43]], (1.0, 0.0))]
    b = collate(enc, tiny_tokenizer.pad_token_id, layout="flat")
    spans = b.spans.tolist()
    assert len(spans) == 2 + 3 + 5 + 2 - (1 if not enc[1].response_ids[2] else 0)
    seen: list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor | None, bool]] = []
    real = F.scaled_dot_product_attention
    config = model.base_model.config
    assert config.num_key_value_heads < config.num_attention_heads  # the tiny model is GQA

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        assert (q.shape[1], k.shape[1], v.shape[1]) == (config.num_attention_heads, config.num_key_value_heads,
                                                         config.num_key_value_heads)
        assert kwargs["enable_gqa"] is True
        seen.append((tuple(q.shape), tuple(k.shape), attn_mask, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        base = model(**b.model_inputs()).rewards
    monkeypatch.undo()
    assert len(seen) == 2 * len(spans)  # 2 layers
    for (q_shape, k_shape, mask, causal), (q0, q1, p0, p1) in zip(seen, spans + spans):
        assert q_shape[2] == q1 - q0 and k_shape[2] == (q1 - q0) + (p1 - p0)
        if p1 == p0:
            assert mask is None and causal
        else:  # the prefix whole, then the span causally
            n, p = q1 - q0, p1 - p0
            expected = torch.cat([torch.ones(n, p, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
            assert not causal and torch.equal(mask[0, 0], expected)

    assert_edits_stay_in_their_record(model, enc, tiny_tokenizer.pad_token_id, "flat", base)


def test_flat_layout_refused_where_spans_cannot_run(tiny_model_dir, tiny_tokenizer) -> None:
    """A model whose attention cannot take spans says why and never reads a flat batch; one whose
    layers dropped the spans (every token would see the whole row) is caught after the forward."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from rmkit.attention import span_attention_refusal
    from rmkit.errors import RmkitError

    b = collate(encoded(tiny_tokenizer), tiny_tokenizer.pad_token_id, layout="flat")
    eager = RewardModel(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="eager"))
    assert not eager.span_attention and eager.span_attention_refusal == "its attention is 'eager', not sdpa"
    with pytest.raises(RmkitError, match="this model cannot take the flat layout: its attention is 'eager', not sdpa"):
        eager(**b.model_inputs())
    windowed = AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=8), attn_implementation="sdpa")
    assert span_attention_refusal(windowed.model) == "it uses a sliding attention window"

    dropped = RewardModel.from_pretrained(tiny_model_dir)
    assert dropped.span_attention
    dropped.base_model.set_attn_implementation("sdpa")  # layers no longer hand the spans to span attention
    with pytest.raises(RmkitError, match="LlamaModel did not pass the attention spans to its attention"):
        dropped(**b.model_inputs())


def test_span_attention_is_not_saved(tiny_model_dir, tmp_path) -> None:
    """The attention choice lives in memory only: a saved folder names no rmkit attention."""
    rm = RewardModel.from_pretrained(tiny_model_dir)
    assert rm.config._attn_implementation == SPAN_ATTENTION
    rm.save_pretrained(tmp_path / "out")
    assert SPAN_ATTENTION not in (tmp_path / "out" / "config.json").read_text()
