"""Tokenization, truncation and collation produce exactly the tensors documented."""

from __future__ import annotations

import pytest
import torch

from rmkit.data.collate import IGNORE_INDEX, EncodedRecord, collate, encode_record, special_prefix
from rmkit.data.records import Record

X = IGNORE_INDEX


class CharTokenizer:
    """One id per character (ord(c) + 10); BOS (1) in front when adding special tokens."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) + 10 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def ids(text: str) -> list[int]:
    return [ord(c) + 10 for c in text]


def example() -> list[EncodedRecord]:
    return [
        EncodedRecord([5, 6], [[7], [8, 9]], (1.0, 0.0)),
        EncodedRecord([5], [[3], [4, 4], [2]], (2.0, 1.0, 1.0)),
    ]


def test_collate_exact_right_padding() -> None:
    assert IGNORE_INDEX == -100 == torch.nn.CrossEntropyLoss().ignore_index  # what cross-entropy skips
    b = collate(example(), pad_id=0, padding_side="right", lm_target="response")
    assert b.input_ids.tolist() == [[5, 6, 7, 0], [5, 6, 8, 9], [5, 3, 0, 0], [5, 4, 4, 0], [5, 2, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 2], [0, 1, 2, 3], [0, 1, 1, 1], [0, 1, 2, 2], [0, 1, 1, 1]]
    assert b.record_index.tolist() == [0, 0, 1, 1, 1] and b.reward_of.tolist() == [0, 1, 2, 3, 4]
    assert b.better.tolist() == [0, 2, 2] and b.worse.tolist() == [1, 3, 4]
    # position 1 of row 0 predicts 7; position 0 of row 2 predicts 3; token mean: 1/2 each
    assert b.lm_index.tolist() == [[0, 1], [2, 0]] and b.lm_token.tolist() == [7, 3]
    assert b.lm_weight.tolist() == [0.5, 0.5] and b.lm_weight.dtype == torch.float32
    assert b.lm_grid().tolist() == [[X, 7, X, X], [X] * 4, [3, X, X, X], [X] * 4, [X] * 4]
    assert (b.n_tokens, b.n_truncated, b.n_rows, b.n_lm_targets) == (14, 0, 5, 2)
    for t in (b.input_ids, b.attention_mask, b.position_ids, b.lm_index, b.lm_token, b.better, b.worse,
              b.record_index, b.reward_of):
        assert t.dtype == torch.long


def test_collate_exact_left_padding_whole_target() -> None:
    b = collate(example(), pad_id=0, padding_side="left", lm_target="whole")
    assert b.input_ids.tolist() == [[0, 5, 6, 7], [5, 6, 8, 9], [0, 0, 5, 3], [0, 5, 4, 4], [0, 0, 5, 2]]
    assert b.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]
    assert b.position_ids.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 1, 2], [0, 0, 0, 1]]
    # the row's first token (5) is never a target: under left padding a pad would predict it
    assert b.lm_grid().tolist() == [[X, 6, 7, X], [X] * 4, [X, X, 3, X], [X] * 4, [X] * 4]
    assert torch.equal(b.lm_weight, torch.full((3,), 1 / 3))  # 3 target tokens: 6, 7 of record 0 and 3
    # the same attended positions as right padding
    r = collate(example(), pad_id=0, padding_side="right")
    assert b.position_ids[b.attention_mask.bool()].tolist() == r.position_ids[r.attention_mask.bool()].tolist()


def test_collate_no_target_and_preferred_rows() -> None:
    assert collate(example(), 0).n_lm_targets == 0
    recs = example() + [EncodedRecord([4], [[6], [7, 7, 7]], (1.0, 1.0))]  # tied at the top: dropped
    b = collate(recs, pad_id=0, lm_target="response", rows="preferred")
    assert b.input_ids.tolist() == [[5, 6, 7], [5, 3, 0]]
    assert b.lm_grid().tolist() == [[X, 7, X], [3, X, X]]
    assert b.record_index.tolist() == [0, 1]
    assert b.better.numel() == 0 and b.worse.numel() == 0
    empty = collate([recs[-1]], pad_id=0, rows="preferred")
    assert empty.input_ids.shape == (0, 0) and empty.n_tokens == 0


def test_collate_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="lm_target"):
        collate(example(), 0, lm_target="prompt")
    with pytest.raises(ValueError, match="padding_side"):
        collate(example(), 0, padding_side="middle")


def test_encode_shares_prompt_and_adds_bos() -> None:
    rec = Record("ab", ("x", "yz"), (0.0, 1.0))
    enc = encode_record(rec, CharTokenizer(), max_length=16)
    assert enc.prompt_ids == [1] + ids("ab")
    assert enc.response_ids == [ids("x"), ids("yz")]
    assert not enc.truncated and enc.row_lengths() == [4, 5]
    enc = encode_record(rec, CharTokenizer(), max_length=16, append_eos=True)
    assert enc.response_ids == [ids("x") + [2], ids("yz") + [2]]


def test_encode_truncates_prompt_for_longest_response() -> None:
    rec = Record("abcdef", ("x", "yz"), (0.0, 1.0))  # BOS + 6 prompt tokens, longest response 2
    left = encode_record(rec, CharTokenizer(), max_length=5, truncation_side="left")
    assert left.prompt_ids == [1] + ids("ef") and left.truncated  # keeps BOS, drops the start
    assert left.response_ids == [ids("x"), ids("yz")]
    right = encode_record(rec, CharTokenizer(), max_length=5, truncation_side="right")
    assert right.prompt_ids == [1] + ids("ab") and right.truncated
    assert max(left.row_lengths()) == 5 and max(right.row_lengths()) == 5


def test_encode_truncates_long_response() -> None:
    rec = Record("ab", ("hello", "x"), (1.0, 0.0))
    left = encode_record(rec, CharTokenizer(), max_length=3, truncation_side="left")
    assert left.prompt_ids == [] and left.response_ids == [ids("llo"), ids("x")] and left.truncated
    right = encode_record(rec, CharTokenizer(), max_length=3, truncation_side="right")
    assert right.prompt_ids == [] and right.response_ids == [ids("hel"), ids("x")]
    # the appended eos always survives
    eos = encode_record(rec, CharTokenizer(), max_length=3, truncation_side="right", append_eos=True)
    assert eos.response_ids == [ids("he") + [2], ids("x") + [2]]


def test_encode_with_real_tokenizer(tiny_tokenizer, tiny_records) -> None:
    tok = tiny_tokenizer
    assert special_prefix(tok) == [tok.bos_token_id]
    encoded = [encode_record(r, tok, max_length=64) for r in tiny_records]
    for rec, enc in zip(tiny_records, encoded):
        assert enc.prompt_ids == [tok.bos_token_id] + tok(rec.prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(enc.prompt_ids[1:] + enc.response_ids[0]) == rec.prompt + rec.responses[0]
    b = collate(encoded, tok.pad_token_id, lm_target="response")
    assert b.n_rows == 8 and b.n_truncated == 0
    # pairs: record 0 (0>1), record 1 (0>1, 0>2; 1 and 2 tie), record 2 (0>2, 1>2; top tie)
    assert list(zip(b.better.tolist(), b.worse.tolist())) == [(0, 1), (2, 3), (2, 4), (5, 7), (6, 7)]
    # targets only on preferred rows of records 0 and 1 (record 2 has no unique best)
    assert sorted(set(b.lm_index[:, 0].tolist())) == [0, 2]
    short = [encode_record(r, tok, max_length=8) for r in tiny_records]
    assert collate(short, tok.pad_token_id).n_truncated == 3
    assert max(max(e.row_lengths()) for e in short) == 8


def test_unique_preferred_rule_shared_by_imitation_and_eval() -> None:
    """preferred_index is the rule: the "token" imitation target and eval's best-vs-runner-up
    group figure both use it (a shared top has neither; the runner-up is the first of a tie)."""
    from rmkit.data.collate import imitation_rows
    from rmkit.data.records import preferred_index
    from rmkit.score import SetResult, tally

    assert preferred_index((1.0, 3.0, 2.0, 2.0)) == 1 and preferred_index((1.0, 3.0, 3.0, 0.0)) is None
    assert imitation_rows((1.0, 3.0, 2.0, 2.0), "token") == [1] and imitation_rows((1.0, 3.0, 3.0, 0.0), "token") == []
    res = SetResult()
    # best 1 (reward 5) vs the first runner-up 2 (reward 4): right, though response 3 (6) beats it
    tally(res, EncodedRecord([1], [[2], [3], [4], [5]], (1.0, 3.0, 2.0, 2.0)), [0.0, 5.0, 4.0, 6.0], [1] * 4)
    assert (res.groups, res.groups_top2_correct, res.groups_all_correct) == (1, 1, 0)
    tally(res, EncodedRecord([1], [[2], [3], [4], [5]], (1.0, 3.0, 3.0, 0.0)), [0.0, 5.0, 4.0, -1.0], [1] * 4)
    assert (res.groups, res.groups_top2_correct) == (2, 1)  # a shared top counts as a group, never as right
    b = collate([EncodedRecord([5], [[6], [7], [8], [9]], (1.0, 3.0, 3.0, 0.0))], 0, lm_target="response")
    assert b.n_lm_targets == 0


def test_packed_length_of_a_record_and_of_a_group() -> None:
    """[prompt][resp_1]...[resp_k]: a record counts each response it lists, a group (records
    sharing a prompt) each distinct response once, which is its block width in the packed layout."""
    from rmkit.data.collate import group_shared, packed_length

    a = EncodedRecord([5, 6], [[7], [8, 9]], (1.0, 0.0))
    b = EncodedRecord([5, 6], [[7], [3]], (1.0, 0.0))
    assert packed_length(a) == 2 + 1 + 2 and packed_length(b) == 2 + 1 + 1
    assert packed_length(EncodedRecord([5], [[7], [7]], (1.0, 1.0))) == 3  # listed twice, counted twice
    (group,), _ = group_shared([a, b])
    assert packed_length(group) == 2 + 1 + 2 + 1  # [5, 6][7][8, 9][3]: response [7] once
    packed = collate([a, b], pad_id=0, layout="packed")
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 3]] and packed.input_ids.shape[1] == packed_length(group)
