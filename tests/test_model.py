"""RewardModel: padding-safe pooling, chunked imitation loss, and Hugging Face round trips."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rmkit.data.collate import IGNORE_INDEX, collate, encode_record
from rmkit.errors import RmkitError
from rmkit.loss import combine, imitation_loss, ranking_loss
from rmkit.model import LM_HEAD_FILE, POOLINGS, RewardModel


def batch(records, tok, padding_side="right", lm_target="none", append_eos=False):
    enc = [encode_record(r, tok, max_length=64, append_eos=append_eos) for r in records]
    return collate(enc, tok.pad_token_id, padding_side=padding_side, lm_target=lm_target)


def run(model, b, with_lm=False, **kw):
    lm = dict(lm_index=b.lm_index, lm_token=b.lm_token, lm_weight=b.lm_weight) if with_lm else {}
    return model(b.input_ids, b.attention_mask, b.position_ids, **lm, **kw)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> RewardModel:
    return RewardModel.from_pretrained(tiny_model_dir).eval()


def test_structure(model: RewardModel, tiny_model_dir: Path) -> None:
    assert model.tied  # tie_word_embeddings survived loading
    assert model.score.weight.shape == (1, 32) and model.score.bias is None
    head = RewardModel.from_pretrained(tiny_model_dir, head_seed=0).score.weight.detach()
    assert_close(head, model.score.weight.detach())  # seeded head: reproducible
    assert not torch.equal(RewardModel.from_pretrained(tiny_model_dir, head_seed=1).score.weight.detach(), head)
    # std 1/sqrt(hidden + 1) = 0.174, within sampling noise of 32 draws
    assert 0.10 < float(head.std()) < 0.25


@pytest.mark.parametrize("pooling", POOLINGS)
def test_left_and_right_padding_agree(model, tiny_tokenizer, tiny_records, pooling) -> None:
    model.pooling = pooling
    try:
        eos = pooling == "eos"
        with torch.no_grad():
            right = run(model, batch(tiny_records, tiny_tokenizer, "right", append_eos=eos)).rewards
            left = run(model, batch(tiny_records, tiny_tokenizer, "left", append_eos=eos)).rewards
    finally:
        model.pooling = "last"
    assert right.shape == (8,) and right.dtype == torch.float32 and torch.isfinite(right).all()
    assert_close(left, right, atol=1e-5, rtol=1e-5)
    assert right.unique().numel() == 8  # different rows give different rewards


def test_last_pooling_equals_unpadded_forward(model, tiny_tokenizer, tiny_records) -> None:
    b = batch(tiny_records, tiny_tokenizer, "right")
    with torch.no_grad():
        rewards = run(model, b).rewards
        for i in range(b.n_rows):
            n = int(b.attention_mask[i].sum())
            ids = b.input_ids[i:i + 1, :n]
            single = model(ids, torch.ones_like(ids)).rewards
            # the same thing by hand: decoder, last hidden state, head
            hidden = model.base_model(input_ids=ids).last_hidden_state[0, -1]
            assert_close(single[0], rewards[i], atol=1e-5, rtol=1e-5)
            assert_close(model.score(hidden)[0], rewards[i], atol=1e-5, rtol=1e-5)


def test_eos_pooling_reads_the_eos_position(model, tiny_tokenizer, tiny_records) -> None:
    b = batch(tiny_records, tiny_tokenizer, "right", append_eos=True)
    last = b.attention_mask.sum(1) - 1
    assert (b.input_ids[torch.arange(b.n_rows), last] == tiny_tokenizer.eos_token_id).all()


def naive_lm_loss(tiny_model_dir, b):
    """Full logits from the plain causal LM, cross-entropy averaged over every target token
    (position t predicting lm_grid()[t])."""
    from transformers import AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    logits = causal(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.lm_grid().reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="mean")
    return causal, loss


@pytest.mark.parametrize("chunk", [1, 3, 100_000])
@pytest.mark.parametrize("lm_target", ["response", "whole"])
def test_imitation_matches_naive_cross_entropy(tiny_model_dir, tiny_tokenizer, tiny_records, chunk, lm_target) -> None:
    b = batch(tiny_records, tiny_tokenizer, "left", lm_target=lm_target)
    n_targets = int((b.lm_grid() != IGNORE_INDEX).sum())
    causal, expected = naive_lm_loss(tiny_model_dir, b)
    expected.backward()

    rm = RewardModel.from_pretrained(tiny_model_dir)
    out = run(rm, b, with_lm=True, lm_chunk_size=chunk)
    assert out.lm_tokens == n_targets > 0
    assert_close(out.lm_loss, expected, atol=1e-5, rtol=1e-5)
    out.lm_loss.backward()
    grads = {f"base_model.{k[len('model.'):]}": p.grad for k, p in causal.named_parameters() if k.startswith("model.")}
    for name, p in rm.named_parameters():
        if name == "score.weight":
            assert p.grad is None  # the LM loss does not touch the reward head
        else:
            assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert imitation_loss(out.lm_loss) is out.lm_loss


def count_lm_head_calls(model: RewardModel) -> list[int]:
    calls = [0]
    model.lm_head.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_no_vocabulary_logits_without_targets(tiny_model_dir, tiny_tokenizer, tiny_records) -> None:
    rm = RewardModel.from_pretrained(tiny_model_dir)
    calls = count_lm_head_calls(rm)
    b = batch(tiny_records, tiny_tokenizer, lm_target="none")
    out = run(rm, b)
    assert (out.lm_loss, out.lm_tokens, calls[0]) == (None, 0, 0)
    out = run(rm, b, with_lm=True)  # targets given but none there
    assert b.n_lm_targets == 0 and (out.lm_loss, out.lm_tokens, calls[0]) == (None, 0, 0)
    out.rewards.sum().backward()
    assert calls[0] == 0

    b = batch(tiny_records, tiny_tokenizer, lm_target="response")
    out = run(rm, b, with_lm=True, lm_chunk_size=3)
    chunks = -(-out.lm_tokens // 3)
    assert calls[0] == chunks  # one lm_head call per chunk in forward ...
    out.lm_loss.backward()
    assert calls[0] == 2 * chunks  # ... and one recompute per chunk in backward (checkpointed)


def test_padded_lm_targets_equalise_lm_head_calls_and_add_exactly_zero(tiny_model_dir, tiny_tokenizer,
                                                                        tiny_records) -> None:
    """ZeRO-3's chunk balance: a rank with fewer imitation targets is padded to the busiest rank's
    count, so both call lm_head equally often; the padding changes neither loss nor gradient."""
    from rmkit.train.loop import pad_lm_targets

    b = batch(tiny_records, tiny_tokenizer, lm_target="response")
    n = b.n_lm_targets
    padded = pad_lm_targets(b, n + 5)
    assert padded.n_lm_targets == n + 5 and pad_lm_targets(b, n - 1) is b
    assert padded.lm_index[n:].eq(0).all() and padded.lm_token[n:].eq(0).all() and padded.lm_weight[n:].eq(0).all()
    results = []
    for bb in (b, padded):
        rm = RewardModel.from_pretrained(tiny_model_dir)
        calls = count_lm_head_calls(rm)
        out = run(rm, bb, with_lm=True, lm_chunk_size=3)
        out.lm_loss.backward()
        results.append((calls[0], out.lm_loss.detach(), rm.lm_head.weight.grad.clone()))
    assert results[0][0] == 2 * -(-n // 3) and results[1][0] == 2 * -(-(n + 5) // 3)  # forward + recompute
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    torch.testing.assert_close(results[1][2], results[0][2], rtol=0, atol=1e-7)


def hf_texts(records) -> list[str]:
    return [r.prompt + resp for r in records for resp in r.responses]


def test_reward_folder_loads_in_transformers_with_same_rewards(tiny_model_dir, tiny_tokenizer, tiny_records, tmp_path,
                                                              capfd) -> None:
    from transformers import AutoModelForSequenceClassification

    rm = RewardModel.from_pretrained(tiny_model_dir, head_seed=7).eval()
    rm.save_pretrained(tmp_path / "rm", kind="reward", tokenizer=tiny_tokenizer)
    assert not (tmp_path / "rm" / LM_HEAD_FILE).exists()  # tied: the embeddings are the LM head
    b = batch(tiny_records, tiny_tokenizer, "right")
    capfd.readouterr()
    hf, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), output_loading_info=True)
    # transformers prints a LOAD REPORT (to stderr, not through logging) on any key mismatch
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tiny_tokenizer.pad_token_id
    assert hf.config.rmkit_pooling == "last"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        ours = run(rm, b).rewards
        theirs = hf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.squeeze(-1)
    assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    back = RewardModel.from_pretrained(tmp_path / "rm")  # reward folder -> same head, same pooling
    assert back.pooling == "last" and back.tied
    with torch.no_grad():
        assert_close(run(back.eval(), b).rewards, ours, atol=1e-6, rtol=1e-6)
    with pytest.raises(RmkitError, match="pooling"):
        RewardModel.from_pretrained(tmp_path / "rm", pooling="mean")


def test_untied_head_round_trip(tiny_model_dir, tiny_tokenizer, tiny_records, tmp_path, capfd) -> None:
    """An untied LM head travels in lm_head.safetensors; HF loading of the reward folder stays clean."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    causal = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    cfg = copy.deepcopy(causal.config)
    cfg.tie_word_embeddings = False
    untied = AutoModelForCausalLM.from_config(cfg)
    untied.load_state_dict(causal.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(torch.randn_like(untied.lm_head.weight))
    untied.save_pretrained(tmp_path / "untied")
    tiny_tokenizer.save_pretrained(tmp_path / "untied")

    rm = RewardModel.from_pretrained(tmp_path / "untied", pooling="mean")
    assert not rm.tied
    rm.save_pretrained(tmp_path / "rm", tokenizer=tiny_tokenizer)
    assert (tmp_path / "rm" / LM_HEAD_FILE).is_file()
    capfd.readouterr()
    _, info = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), output_loading_info=True)
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))

    back = RewardModel.from_pretrained(tmp_path / "rm")
    assert "LOAD REPORT" not in capfd.readouterr().err  # score/lm_head keys handled quietly
    assert back.pooling == "mean" and not back.tied
    assert torch.equal(back.lm_head.weight, rm.lm_head.weight)
    b = batch(tiny_records, tiny_tokenizer, lm_target="whole")
    with torch.no_grad():
        a, c = run(rm, b, with_lm=True), run(back, b, with_lm=True)
    assert_close(c.rewards, a.rewards)
    assert_close(c.lm_loss, a.lm_loss)


def test_causal_save_loads_as_causal_lm(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    rm = RewardModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        rm.base_model.embed_tokens.weight.add_(0.01)  # so we know the saved weights are ours
    rm.save_pretrained(tmp_path / "lm", kind="causal", tokenizer=tiny_tokenizer)
    lm, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lm"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still tied
    ids = torch.tensor([tiny_tokenizer("User: hi. Assistant: hello")["input_ids"]])
    with torch.no_grad():
        hidden = rm.base_model(input_ids=ids).last_hidden_state
        assert_close(lm(input_ids=ids).logits, rm.lm_head(hidden), atol=1e-5, rtol=1e-5)
    assert "rmkit_pooling" not in (tmp_path / "lm" / "config.json").read_text()
    # a causal folder written by rmkit loads back as a fresh reward model
    assert RewardModel.from_pretrained(tmp_path / "lm").tied


def test_one_step_changes_parameters(tiny_model_dir, tiny_tokenizer, tiny_records) -> None:
    rm = RewardModel.from_pretrained(tiny_model_dir).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5.x deprecates the old method name
        rm.gradient_checkpointing_enable()
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2)
    b = batch(tiny_records, tiny_tokenizer, lm_target="whole")
    out = run(rm, b, with_lm=True, lm_chunk_size=4)
    loss = combine(ranking_loss(out.rewards, b.better, b.worse), imitation_loss(out.lm_loss),
                   1.0, 0.5)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = {n for n, p in rm.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before)  # every parameter, incl. score head and (tied) embeddings
