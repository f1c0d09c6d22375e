"""Tokenization and collation: records -> tensors for the reward model.

A record's prompt is tokenized once (with the tokenizer's own leading special tokens, e.g. BOS)
and each response separately without special tokens, then concatenated; every response of a
record therefore starts with exactly the same prompt ids. That keeps the imitation target
boundary exact and lets later code share the prompt prefix.

Nothing here touches torch.distributed: ranks get their batches from the caller.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from rmkit.data.records import Record
from rmkit.errors import RmkitError

IGNORE_INDEX = -100  # label value that cross-entropy skips
TRUNCATION_SIDES = ("left", "right")
PADDING_SIDES = ("left", "right")
LM_TARGETS = ("none", "response", "whole")
ROW_MODES = ("all", "preferred")


@dataclass
class EncodedRecord:
    """One record as token ids. Row i = prompt_ids + response_ids[i]."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    scores: tuple[float, ...]
    truncated: bool = False

    def row_lengths(self) -> list[int]:
        return [len(self.prompt_ids) + len(r) for r in self.response_ids]

    def max_length(self) -> int:
        """Longest row: what the record costs in a batch (for length grouping)."""
        return max(self.row_lengths())

    def preferred(self) -> int | None:
        """Index of the unique top-scored response, None when the top score is shared."""
        return _preferred(self.scores)


@dataclass
class Batch:
    """Tensors for one micro-batch; rows = every kept response, record by record.

    input_ids, attention_mask, position_ids, lm_labels: [N, L] long; record_index: [N] long;
    scores: [N] float32; better, worse: [P] long row indices (row better[k] beats worse[k]).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    record_index: torch.Tensor
    scores: torch.Tensor
    better: torch.Tensor
    worse: torch.Tensor
    lm_labels: torch.Tensor
    n_tokens: int  # attended tokens
    n_truncated: int  # records in this batch that lost tokens to max_length

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: Any) -> "Batch":
        """A copy with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)


def _preferred(scores: Sequence[float]) -> int | None:
    top = max(scores)
    best = [i for i, s in enumerate(scores) if s == top]
    return best[0] if len(best) == 1 else None


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts BEFORE a text (e.g. [BOS]); [] if none.

    Found by encoding a probe with and without special tokens, so a tokenizer that appends
    EOS when adding special tokens does not leak that EOS into the middle of a row.
    """
    plain = _ids(tokenizer, "x")
    full = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def encode_record(record: Record, tokenizer: Any, max_length: int, truncation_side: str = "left",
                  append_eos: bool = False) -> EncodedRecord:
    """Tokenize one record so that every row fits in `max_length` tokens.

    Per record: a response longer than max_length (minus 1 for an appended eos) keeps its last
    (left) or first (right) tokens; then the prompt is cut so that prompt + the LONGEST response
    fits, the same cut for every response. Left truncation drops the start of the prompt body
    but keeps the leading special tokens (BOS) while there is room. With `append_eos` the
    tokenizer's eos ends every response and always survives truncation ("eos" pooling reads it).
    """
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    eos: list[int] = []
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise RmkitError("pooling 'eos' needs an eos token, and this tokenizer has none",
                             hint="use pooling 'last', or a tokenizer with an eos token")
        eos = [int(tokenizer.eos_token_id)]
    if max_length < 1 + len(eos):
        raise ValueError(f"max_length must be at least {1 + len(eos)}, got {max_length}")
    left = truncation_side == "left"

    truncated = False
    limit = max_length - len(eos)
    responses: list[list[int]] = []
    for text in record.responses:
        r = _ids(tokenizer, text)
        if len(r) > limit:
            truncated = True
            r = r[len(r) - limit:] if left else r[:limit]
        responses.append(r + eos)

    prefix = special_prefix(tokenizer)
    body = _ids(tokenizer, record.prompt)
    prompt = prefix + body
    budget = max_length - max(len(r) for r in responses)
    if len(prompt) > budget:
        truncated = True
        if left and budget >= len(prefix):
            keep = budget - len(prefix)
            prompt = prefix + body[len(body) - keep:] if keep else list(prefix)
        else:
            prompt = prompt[:budget]
    if not prompt and any(not r for r in responses):
        raise RmkitError("a record has an empty prompt and an empty response: that row has no tokens",
                         where=record.source or None,
                         hint="drop such records when converting the data")
    return EncodedRecord(prompt, responses, tuple(float(s) for s in record.scores), truncated)


def collate(encoded: Sequence[EncodedRecord], pad_id: int, padding_side: str = "right",
            lm_target: str = "none", rows: str = "all") -> Batch:
    """Pad the rows of several records into one batch; L = the longest row, no more.

    lm_target marks the imitation targets in lm_labels (all other positions are -100), only on
    each record's unique preferred row (records with a tied top score get none):
    "response" = its response tokens, "whole" = prompt + response tokens (the paper's
    setting), "none" = no targets. rows="preferred" keeps only those preferred rows (plain LM
    training); records without a unique preferred response then contribute nothing.
    position_ids = cumsum(mask) - 1 clamped at 0, so left and right padding give equal positions.

    Example (pad_id=0, padding_side="right", lm_target="response"):
      record 0: prompt [5, 6], responses [[7], [8, 9]], scores (1, 0)
      record 1: prompt [5], responses [[3], [4, 4], [2]], scores (2, 1, 1)
    gives
      input_ids      [[5, 6, 7, 0], [5, 6, 8, 9], [5, 3, 0, 0], [5, 4, 4, 0], [5, 2, 0, 0]]
      attention_mask [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
      position_ids   [[0, 1, 2, 2], [0, 1, 2, 3], [0, 1, 1, 1], [0, 1, 2, 2], [0, 1, 1, 1]]
      record_index   [0, 0, 1, 1, 1]
      scores         [1., 0., 2., 1., 1.]
      better [0, 2, 2], worse [1, 3, 4]       (rows 3 and 4 tie: no pair)
      lm_labels      [[-100, -100, 7, -100], [-100] * 4, [-100, 3, -100, -100], [-100] * 4, [-100] * 4]
      n_tokens 14, n_truncated 0
    With padding_side="left" row 0 becomes input_ids [0, 5, 6, 7], mask [0, 1, 1, 1],
    positions [0, 0, 1, 2].
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if lm_target not in LM_TARGETS:
        raise ValueError(f"lm_target must be one of {LM_TARGETS}, got {lm_target!r}")
    if rows not in ROW_MODES:
        raise ValueError(f"rows must be one of {ROW_MODES}, got {rows!r}")

    seqs: list[list[int]] = []
    labels: list[list[int]] = []
    record_index: list[int] = []
    scores: list[float] = []
    better: list[int] = []
    worse: list[int] = []
    n_truncated = 0
    for rec_i, enc in enumerate(encoded):
        pref = enc.preferred()
        keep = range(len(enc.response_ids)) if rows == "all" else ([] if pref is None else [pref])
        first_row = len(seqs)
        for j in keep:
            resp = enc.response_ids[j]
            seqs.append(enc.prompt_ids + resp)
            if j == pref and lm_target == "whole":
                labels.append(enc.prompt_ids + resp)
            elif j == pref and lm_target == "response":
                labels.append([IGNORE_INDEX] * len(enc.prompt_ids) + resp)
            else:
                labels.append([IGNORE_INDEX] * (len(enc.prompt_ids) + len(resp)))
            record_index.append(rec_i)
            scores.append(enc.scores[j])
        if rows == "all":
            n = len(enc.response_ids)
            for a in range(n):
                for b in range(n):
                    if enc.scores[a] > enc.scores[b]:
                        better.append(first_row + a)
                        worse.append(first_row + b)
        if keep and enc.truncated:
            n_truncated += 1

    n_rows = len(seqs)
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
    lm_labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, lab) in enumerate(zip(seqs, labels)):
        at = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        input_ids[i, at] = torch.tensor(seq, dtype=torch.long)
        lm_labels[i, at] = torch.tensor(lab, dtype=torch.long)
        attention_mask[i, at] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        record_index=torch.tensor(record_index, dtype=torch.long),
        scores=torch.tensor(scores, dtype=torch.float32),
        better=torch.tensor(better, dtype=torch.long),
        worse=torch.tensor(worse, dtype=torch.long),
        lm_labels=lm_labels,
        n_tokens=int(attention_mask.sum()),
        n_truncated=n_truncated,
    )


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of indices with similar lengths, in random order, deterministic from `seed`.

    Shuffle all indices, sort each mega-batch of 50 * batch_size by length (longest first), cut
    it into batches, then shuffle the batches: little padding, yet no global length order.
    The last batch of each mega-batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches.extend(group[k:k + batch_size] for k in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches
