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
    Packed (`collate_packed`): N = records, and record_index, scores, better, worse index the
    R responses (the reward vector) in the same order as the unshared rows.
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
    # Packed layout only (see `collate(pack=True)`); None in the one-row-per-response layout.
    segment_ids: torch.Tensor | None = None  # [B, L] long: r response r, -2 - i record i's prompt, -1 pad
    response_end: torch.Tensor | None = None  # [R, 2] long: (row, position read for response r)

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def packed(self) -> bool:
        """Whether rows hold whole records ([prompt][resp_1][resp_2]...), each sharing its prompt."""
        return self.segment_ids is not None

    @property
    def n_responses(self) -> int:
        """Length of the reward vector: one reward per response (= rows when not packed)."""
        return int(self.scores.shape[0])

    @property
    def n_lm_targets(self) -> int:
        """Imitation targets: what the model's chunked LM loss sums over (ZeRO-3 chunk count)."""
        labels = self.lm_labels if self.packed else self.lm_labels[:, 1:]
        return int((labels != IGNORE_INDEX).sum())

    def model_inputs(self, device: Any = None) -> dict[str, torch.Tensor | None]:
        """The keyword arguments `RewardModel.forward` takes for this layout (labels excluded)."""
        names = ["input_ids", "attention_mask", "position_ids", "segment_ids", "response_end"]
        if self.packed:
            names.append("record_index")
        out: dict[str, torch.Tensor | None] = {}
        for n in names:
            t = getattr(self, n)
            out[n] = t.to(device, non_blocking=True) if (t is not None and device is not None) else t
        return out

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
            lm_target: str = "none", rows: str = "all", pack: bool = False) -> Batch:
    """Pad the rows of several records into one batch; L = the longest row, no more.

    lm_target marks the imitation targets in lm_labels (all other positions are -100), only on
    each record's unique preferred row (records with a tied top score get none):
    "response" = its response tokens, "whole" = prompt + response tokens (the paper's
    setting), "none" = no targets; a row's first token is never a target (nothing predicts
    it). rows="preferred" keeps only those preferred rows (plain LM
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

    pack=True (rows="all" only) gives the prefix-sharing layout of `collate_packed`.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if lm_target not in LM_TARGETS:
        raise ValueError(f"lm_target must be one of {LM_TARGETS}, got {lm_target!r}")
    if rows not in ROW_MODES:
        raise ValueError(f"rows must be one of {ROW_MODES}, got {rows!r}")
    if pack and rows == "all":
        return collate_packed(encoded, pad_id, padding_side, lm_target)

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
                lab = enc.prompt_ids + resp
            elif j == pref and lm_target == "response":
                lab = [IGNORE_INDEX] * len(enc.prompt_ids) + resp
            else:
                lab = [IGNORE_INDEX] * (len(enc.prompt_ids) + len(resp))
            # A row's first token has no predictor, so it is never a target (under left
            # padding the position before it is a pad).
            labels.append([IGNORE_INDEX] + lab[1:] if lab else lab)
            record_index.append(rec_i)
            scores.append(enc.scores[j])
        if rows == "all":
            _add_pairs(enc.scores, first_row, better, worse)
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


def _add_pairs(scores: Sequence[float], first: int, better: list[int], worse: list[int]) -> None:
    """Every (a, b) with scores[a] > scores[b], as indices offset by `first`."""
    n = len(scores)
    for a in range(n):
        for b in range(n):
            if scores[a] > scores[b]:
                better.append(first + a)
                worse.append(first + b)


def packed_length(enc: EncodedRecord) -> int:
    """Tokens of a record in the packed layout: its prompt once plus every response."""
    return len(enc.prompt_ids) + sum(len(r) for r in enc.response_ids)


def bin_pack(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: record indices per row, no row longer than `width` (ties keep
    index order, so the result depends only on the lengths)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def collate_packed(encoded: Sequence[EncodedRecord], pad_id: int, padding_side: str = "right",
                   lm_target: str = "none") -> Batch:
    """Each record as one block [prompt][resp_1][resp_2]... (the prompt shared by its responses);
    blocks packed into rows no longer than the longest block (first-fit decreasing).

    The prompt is computed once instead of once per response, and short records share a row
    instead of padding. The model builds the attention mask from segment_ids (a prompt is
    causal; a response sees its own record's prompt and itself, nothing else) and position_ids
    restart after the prompt for every response, so each response's hidden states equal those
    of its own unshared row. Everything indexed by response keeps `collate`'s order and meaning:
    scores, record_index, better/worse index the reward vector [R] exactly as rows do unshared.

    segment_ids: r (>= 0) on response r's tokens, -2 - i on record i's prompt, -1 on padding.
    lm_labels here are SHIFTED: lm_labels[b, t] is the token position t predicts (not the token
    at t), because a response's first token is predicted from its prompt's last position, which
    is not the position before it unless it is the first response. response_end[r] = (row,
    position) of response r's last token (of its prompt's last token, for an empty response).

    Example (pad_id=0, padding_side="right", lm_target="response"), the records of `collate`
    (blocks of 5 tokens each: one per row):
      input_ids    [[5, 6, 7, 8, 9], [5, 3, 4, 4, 2]]
      segment_ids  [[-2, -2, 0, 1, 1], [-3, 2, 3, 3, 4]]
      position_ids [[0, 1, 2, 2, 3], [0, 1, 1, 2, 1]]
      lm_labels    [[X, 7, X, X, X], [3, X, X, X, X]]       (X = -100)
      response_end [[0, 2], [0, 4], [1, 1], [1, 3], [1, 4]]
      better [0, 2, 2], worse [1, 3, 4]; n_tokens 10 (14 unshared)
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if lm_target not in LM_TARGETS:
        raise ValueError(f"lm_target must be one of {LM_TARGETS}, got {lm_target!r}")
    blocks: list[tuple[list[int], list[int], list[int], list[int]]] = []  # ids, segments, positions, labels
    ends: list[tuple[int, int]] = []  # (record, offset in its block)
    record_index: list[int] = []
    scores: list[float] = []
    better: list[int] = []
    worse: list[int] = []
    n_truncated = 0
    for rec_i, enc in enumerate(encoded):
        pref = enc.preferred() if lm_target != "none" else None
        prompt = enc.prompt_ids
        p = len(prompt)
        seq, seg, pos = list(prompt), [-2 - rec_i] * p, list(range(p))
        lab = [IGNORE_INDEX] * p
        if pref is not None and lm_target == "whole" and p > 1:
            lab[:p - 1] = prompt[1:]  # position t predicts prompt[t + 1]
        _add_pairs(enc.scores, len(scores), better, worse)
        for j, resp in enumerate(enc.response_ids):
            start = len(seq)
            seq += resp
            seg += [len(scores)] * len(resp)
            pos += range(p, p + len(resp))
            lab += [IGNORE_INDEX] * len(resp)
            if j == pref and resp:
                lab[start:start + len(resp) - 1] = resp[1:]
                if p:
                    lab[p - 1] = resp[0]  # the prompt's last position predicts the first token
            ends.append((rec_i, start + len(resp) - 1 if resp else p - 1))
            record_index.append(rec_i)
            scores.append(enc.scores[j])
        blocks.append((seq, seg, pos, lab))
        n_truncated += int(enc.truncated)

    lengths = [len(b[0]) for b in blocks]
    width = max(lengths, default=0)
    rows = bin_pack(lengths, width)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    lm_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    where: dict[int, tuple[int, int]] = {}  # record -> (row, column of its first token)
    for r, members in enumerate(rows):
        col = 0 if padding_side == "right" else width - sum(lengths[i] for i in members)
        for i in members:
            seq, seg, pos, lab = blocks[i]
            at = slice(col, col + len(seq))
            input_ids[r, at] = torch.tensor(seq, dtype=torch.long)
            segment_ids[r, at] = torch.tensor(seg, dtype=torch.long)
            position_ids[r, at] = torch.tensor(pos, dtype=torch.long)
            lm_labels[r, at] = torch.tensor(lab, dtype=torch.long)
            where[i] = (r, col)
            col += len(seq)
    response_end = torch.tensor([(where[i][0], where[i][1] + off) for i, off in ends],
                                dtype=torch.long).reshape(-1, 2)
    attention_mask = (segment_ids != -1).long()
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
        segment_ids=segment_ids,
        response_end=response_end,
    )


def packing_pays(encoded: Sequence[EncodedRecord], attention_scale: float = 4096.0) -> bool:
    """Whether the packed layout costs less compute than one row per response for this batch.

    Cost of a padded [rows, L] batch ~ rows * L * (1 + L / attention_scale): the per-token
    matmuls plus attention, which grows with L. Packing removes the repeated prompts and most
    padding (short records share a row) but makes rows longer (a whole record per block), and
    masked attention still computes the whole L x L score matrix. attention_scale = per-token
    matmul FLOPs / per-token-pair attention FLOPs (`RewardModel.attention_scale`); a few
    thousand for 100M+ models.
    """
    if not encoded:
        return False
    plain = max(enc.max_length() for enc in encoded)
    lengths = [packed_length(enc) for enc in encoded]
    width = max(lengths)
    rows = sum(len(enc.response_ids) for enc in encoded)

    def cost(n: int, length: int) -> float:
        return n * length * (1.0 + length / attention_scale)

    return cost(len(bin_pack(lengths, width)), width) < cost(rows, plain)


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
