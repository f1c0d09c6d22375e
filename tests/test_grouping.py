"""Each distinct text once: records sharing a prompt are computed as one group, with every
pair's loss, accuracy and imitation target unchanged, in training and in scoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rmkit.data.collate import LAYOUTS, EncodedRecord, collate, encode_record, group_shared, imitation_rows
from rmkit.data.records import Record
from rmkit.loss import ranking_loss
from rmkit.model import RewardModel
from rmkit.score import SetResult, score_shard, tally
from rmkit.train.schedule import micro_batches, step_records


def dsp_like() -> list[Record]:
    """A DSP query as four pairs (the domain answer against each other answer), an unshared
    HH-style pair, and a second pair on the query's prompt whose preferred text is another."""
    q = "## Human: How should a startup price its first product? ## Assistant:"
    pref = " Start from the value to the customer and test three price points."
    others = (" Cheap.", " Price it like a poem: with feeling.", " Prices are numbers.", " Ask your cat.")
    recs = [Record(q, (pref, o), (1.0, 0.0)) for o in others]
    recs.insert(2, Record("User: hi. Assistant:", (" hello there", " go away"), (1.0, 0.0)))
    recs.append(Record(q, (" Ask your cat.", " Cheap."), (1.0, 0.0)))
    return recs


def encode(records, tok, append_eos=True):
    return [encode_record(r, tok, max_length=256, append_eos=append_eos) for r in records]


def test_group_shared_exact() -> None:
    p, a, b, c = [5, 6], [7], [8, 9], [3]
    encs = [EncodedRecord(p, [a, b], (1.0, 0.0)), EncodedRecord([4], [[1], [2]], (0.0, 1.0)),
            EncodedRecord(p, [a, c], (1.0, 0.0)), EncodedRecord(p, [c, b], (2.0, 1.0))]
    groups, reward_of = group_shared(encs)
    assert [g.prompt_ids for g in groups] == [p, [4]]
    assert groups[0].responses == [a, b, c] and groups[1].responses == [[1], [2]]
    assert groups[0].pairs == [(0, 1), (0, 2), (2, 1)] and groups[1].pairs == [(1, 0)]
    assert groups[0].targets == [2, 0, 1] and groups[1].targets == [0, 1]  # a twice, c once
    assert reward_of == [0, 1, 3, 4, 0, 2, 2, 1]
    b_ = collate(encs, pad_id=0)
    assert b_.n_rows == 5 and b_.n_responses == 5  # 8 response rows without grouping
    assert list(zip(b_.better.tolist(), b_.worse.tolist())) == [(0, 1), (0, 2), (2, 1), (4, 3)]


def test_imitation_weights_hand_computed() -> None:
    """token: every target token weighs 1/3; sequence: each target's mean, then the mean."""
    encs = [EncodedRecord([5], [[3, 4], [9]], (1.0, 0.0)), EncodedRecord([6, 7], [[8], [9]], (1.0, 0.0))]
    for layout in LAYOUTS:
        tok = collate(encs, 0, lm_target="response", layout=layout, reduction="token")
        seq = collate(encs, 0, lm_target="response", layout=layout, reduction="sequence")
        assert tok.lm_token.tolist() == seq.lm_token.tolist()
        by_token = dict(zip(tok.lm_token.tolist(), tok.lm_weight.tolist()))
        assert by_token == pytest.approx({3: 1 / 3, 4: 1 / 3, 8: 1 / 3})
        by_token = dict(zip(seq.lm_token.tolist(), seq.lm_weight.tolist()))
        assert by_token == pytest.approx({3: 0.25, 4: 0.25, 8: 0.5})


def test_imitation_rows_rules() -> None:
    assert imitation_rows((1.0, 0.0, 0.0), "token") == [0]
    assert imitation_rows((1.0, 1.0, 0.0), "token") == []  # a tie at the top: no target
    assert imitation_rows((1.0, 1.0, 0.0), "sequence") == [0, 1]  # the paper trains both
    assert imitation_rows((1.0, 0.86, 0.84), "sequence") == [0, 1]  # within 0.85 of the top
    assert imitation_rows((-1.0, -1.0, -2.0), "sequence") == [0, 1]
    with pytest.raises(ValueError, match="reduction"):
        imitation_rows((1.0, 0.0), "mean")


def pair_layout_loss(model, encs, pad_id, reduction):
    """The reference: every record alone (no group), rewards and targets record by record;
    ranking = mean over all pairs, imitation = the reduction over all targets of the batch."""
    rewards, better, worse, lm_sum, lm_norm = [], [], [], 0.0, 0.0
    offset = 0
    for enc in encs:
        b = collate([enc], pad_id, "right", "whole", reduction=reduction)
        out = model(**b.model_inputs(with_lm=True))
        rewards.append(out.rewards)
        better.append(b.better + offset)
        worse.append(b.worse + offset)
        offset += b.n_responses
        if out.lm_loss is not None:
            # lm_loss is this record's own mean; undo its normaliser to sum across records
            norm = b.n_lm_targets if reduction == "token" else len(imitation_rows(enc.scores, reduction))
            lm_sum = lm_sum + out.lm_loss * norm
            lm_norm += norm
    r = torch.cat(rewards)
    return ranking_loss(r, torch.cat(better), torch.cat(worse)), lm_sum / lm_norm, r


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_batch_equals_pair_layout(tiny_model_dir, tiny_tokenizer, reduction, layout) -> None:
    encs = encode(dsp_like(), tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    grads, losses = [], []
    for grouped in (True, False):
        rm = RewardModel.from_pretrained(tiny_model_dir)
        if grouped:
            b = collate(encs, pad, "right", "whole", layout=layout, reduction=reduction)
            assert b.n_responses == 7  # the query's 5 distinct texts (its last pair reuses two), HH's 2
            out = rm(**b.model_inputs(with_lm=True))
            rank_l, im_l = ranking_loss(out.rewards, b.better, b.worse), out.lm_loss
            per_record = out.rewards[b.reward_of]
        else:
            rank_l, im_l, per_record = pair_layout_loss(rm, encs, pad, reduction)
        assert per_record.shape == (12,)
        losses.append((rank_l, im_l, per_record))
        (rank_l + 0.5 * im_l).backward()
        grads.append({n: p.grad.clone() for n, p in rm.named_parameters()})
    (r0, i0, p0), (r1, i1, p1) = losses
    assert_close(p0, p1, atol=1e-5, rtol=1e-5)  # every record's rewards
    assert_close(r0, r1, atol=1e-6, rtol=1e-5)
    assert_close(i0, i1, atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_sequence_reduction_is_the_papers_formula(tiny_model_dir, tiny_tokenizer) -> None:
    """Linear95/DSP trainer.py language_modeling_loss: full logits of each whole row (bos +
    prompt + response + eos), per-row mean NLL over positions 1.., averaged over the rows whose
    score / (max + 1e-5) passes 0.85 — here a record with two tied top responses and a pair."""
    from transformers import AutoModelForCausalLM

    recs = [Record("User: pick one. Assistant:", (" red", " blue and green", " no"), (1.0, 1.0, 0.0)),
            Record("User: hi. Assistant:", (" hello there", " go away"), (1.0, 0.0))]
    encs = encode(recs, tiny_tokenizer)
    rows, scores = [], []
    for rec, enc in zip(recs, encs):
        top = max(rec.scores)
        for resp, s in zip(enc.response_ids, rec.scores):
            rows.append(enc.prompt_ids + resp)
            scores.append(s / (top + 1e-5))
    causal = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    per_row = []
    for row in rows:
        ids = torch.tensor([row])
        logits = causal(input_ids=ids).logits[0, :-1]
        per_row.append(F.cross_entropy(logits, ids[0, 1:], reduction="mean"))
    mask = torch.tensor([float(s > 0.85) for s in scores])
    expected = (torch.stack(per_row) * mask).sum() / mask.sum()
    assert mask.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    rm = RewardModel.from_pretrained(tiny_model_dir)
    for layout in LAYOUTS:
        b = collate(encs, tiny_tokenizer.pad_token_id, "right", "whole", layout=layout, reduction="sequence")
        out = rm(**b.model_inputs(with_lm=True))
        assert_close(out.lm_loss, expected, atol=1e-5, rtol=1e-5)
    token = collate(encs, tiny_tokenizer.pad_token_id, "right", "whole", reduction="token")
    assert set(token.lm_index[:, 0].tolist()) == {3}  # token reduction: the unique top of the pair only


def test_scoring_groups_give_equal_rewards_and_accuracy(tiny_model_dir, tiny_tokenizer) -> None:
    encs = encode(dsp_like(), tiny_tokenizer)
    model = RewardModel.from_pretrained(tiny_model_dir).eval()
    calls = []
    hook = model.register_forward_hook(lambda m, a, kw, out: calls.append(int(kw["input_ids"].shape[0])),
                                       with_kwargs=True)
    try:
        got = dict(score_shard(model, encs, 1, tiny_tokenizer.pad_token_id, "right", 0, 1, torch.device("cpu"),
                               prefix_sharing=False))
    finally:
        hook.remove()
    assert sorted(got) == list(range(6))
    assert calls == [5, 2]  # the query's 5 records as one unit of 5 distinct rows (10 unshared), then HH
    result_grouped, result_alone = SetResult(), SetResult()
    with torch.no_grad():
        for i, enc in enumerate(encs):
            alone = model(**collate([enc], tiny_tokenizer.pad_token_id).model_inputs()).rewards.tolist()
            assert got[i] == pytest.approx(alone, abs=1e-5)
            lengths = [len(r) for r in enc.response_ids]
            tally(result_grouped, enc, got[i], lengths)
            tally(result_alone, enc, alone, lengths)
    assert result_grouped.pairs == result_alone.pairs == 6
    assert result_grouped.correct == result_alone.correct


def test_schedule_keeps_a_prompt_group_together() -> None:
    groups = [0, 1, 1, 1, 1, 2, 3, 3]
    orders = [step_records(s, 8, 4, seed=3, groups=groups) for s in range(2)]
    flat = orders[0] + orders[1]
    assert sorted(flat) == list(range(8))
    runs = [groups[i] for i in flat]
    for g in set(runs):  # each group's records are consecutive in the order
        at = runs.index(g)
        assert runs[at:at + groups.count(g)] == [g] * groups.count(g)
    # singleton groups: exactly the plain permutation of records
    assert step_records(1, 8, 4, seed=3, groups=list(range(8))) == step_records(1, 8, 4, seed=3)
    lengths = [9, 1, 2, 3, 4, 8, 5, 5]
    # by each group's longest (9, 8, 5, 4), a group's records adjacent: group 1 fills one micro-batch
    assert micro_batches(list(range(8)), lengths, micro=4, world=1, rank=0, groups=groups) == \
        [[0, 5, 6, 7], [1, 2, 3, 4]]
    assert micro_batches(list(range(8)), lengths, micro=4, world=1, rank=0) == [[0, 5, 6, 7], [4, 3, 2, 1]]
