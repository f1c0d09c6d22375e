"""Tokenization and collation: records -> tensors for the reward model.

A record's prompt is tokenized once (with the tokenizer's own leading special tokens, e.g. BOS)
and each response separately without special tokens, then concatenated; every response of a
record therefore starts with exactly the same prompt ids. That keeps the imitation target
boundary exact and lets later code share the prompt prefix.

Nothing here touches torch.distributed: ranks get their batches from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from rmkit.data.records import Record, preferred_index, strict_pairs
from rmkit.errors import RmkitError

IGNORE_INDEX = -100  # label value that cross-entropy skips
TRUNCATION_SIDES = ("left", "right")
PADDING_SIDES = ("left", "right")
LM_TARGETS = ("none", "response", "whole")
ROW_MODES = ("all", "preferred")
IMITATION_REDUCTIONS = ("token", "sequence")
# "rows": one row per distinct response; "packed": each group one block, blocks bin-packed into
# rows, a 4-D mask keeps them apart; "flat": every block end to end in one row, attention per
# span (rmkit/attention.py). docs/benchmarks.md draws them.
LAYOUTS = ("rows", "packed", "flat")
PAPER_TARGET_RATIO = 0.85  # Linear95/DSP arguments.py lm_score_thresh
# Per-token matmul FLOPs / per-token-pair attention FLOPs assumed when a model does not say
# (`RewardModel.attention_scale`): a few thousand for 100M+ models (see `packing_pays`).
DEFAULT_ATTENTION_SCALE = 4096.0


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


@dataclass
class Group:
    """The records of a batch that share one prompt, each distinct response once.

    pairs: one (better, worse) index into `responses` per strict pair of every member record
    (a pair that two records both hold counts twice, as it does record by record); targets:
    per response, how many member records train it with the imitation loss.
    """

    prompt_ids: list[int]
    responses: list[list[int]]
    pairs: list[tuple[int, int]]
    targets: list[int]
    truncated: int  # member records that lost tokens to max_length


@dataclass
class Batch:
    """Tensors for one micro-batch. The reward vector [R] holds each distinct response of each
    group (records sharing a prompt) once, group by group.

    Row layout (one row per distinct response): input_ids, attention_mask, position_ids [R, L].
    Packed layout (`collate_packed`): rows hold whole groups [prompt][resp_1][resp_2]...;
    segment_ids and response_end say where each response is. Flat layout: the packed layout in
    one row with no padding, plus the attention spans.
    record_index [R]: the group of each reward; better, worse [P]: reward indices, better[k]
    beats worse[k]; reward_of [sum of the records' responses]: for each input record's
    responses in order, its index in the reward vector (so per-record rewards are
    rewards[reward_of]). Imitation targets, the same in both layouts: lm_index [T, 2] (row,
    position of the hidden state that predicts), lm_token [T] (the token it must predict),
    lm_weight [T] float32 (the loss is sum(lm_weight * NLL); weights carry the reduction).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    record_index: torch.Tensor
    better: torch.Tensor
    worse: torch.Tensor
    reward_of: torch.Tensor
    lm_index: torch.Tensor
    lm_token: torch.Tensor
    lm_weight: torch.Tensor
    n_tokens: int  # attended tokens
    n_truncated: int  # records in this batch that lost tokens to max_length
    # Packed and flat layouts only (`collate(layout=...)`); None in the one-row-per-response layout.
    segment_ids: torch.Tensor | None = None  # [B, L] long: r response r, -2 - g group g's prompt, -1 pad
    response_end: torch.Tensor | None = None  # [R, 2] long: (row, position read for response r)
    # Flat layout only: [S, 4] long, (q0, q1, p0, p1) per attention span (rmkit.attention.Spans).
    spans: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def packed(self) -> bool:
        """Whether rows hold whole groups ([prompt][resp_1][resp_2]...), each sharing its prompt."""
        return self.segment_ids is not None

    @property
    def layout(self) -> str:
        """One of LAYOUTS."""
        return "flat" if self.spans is not None else "packed" if self.packed else "rows"

    @property
    def n_responses(self) -> int:
        """Length of the reward vector: one reward per distinct response."""
        return int(self.record_index.shape[0])

    @property
    def n_lm_targets(self) -> int:
        """Imitation targets: what the model's chunked LM loss runs over (ZeRO-3 chunk count)."""
        return int(self.lm_token.shape[0])

    def lm_grid(self) -> torch.Tensor:
        """[rows, L]: the token each position must predict, IGNORE_INDEX elsewhere (for reading
        and tests; a packed prompt end that predicts two responses' first tokens keeps one)."""
        grid = torch.full(tuple(self.input_ids.shape), IGNORE_INDEX, dtype=torch.long)
        if self.lm_token.numel():
            grid[self.lm_index[:, 0], self.lm_index[:, 1]] = self.lm_token
        return grid

    def model_inputs(self, device: Any = None, with_lm: bool = False) -> dict[str, torch.Tensor | None]:
        """The keyword arguments `RewardModel.forward` takes for this layout (imitation
        targets only `with_lm`)."""
        names = ["input_ids", "attention_mask", "position_ids", "segment_ids", "response_end"]
        if self.packed:
            names.append("record_index")
        if self.spans is not None:
            names.append("spans")
        if with_lm:
            names += ["lm_index", "lm_token", "lm_weight"]
        out: dict[str, torch.Tensor | None] = {}
        for n in names:
            t = getattr(self, n)
            keep = n == "spans" or device is None  # spans are read as Python ints: they stay on the CPU
            out[n] = t if (t is None or keep) else t.to(device, non_blocking=True)
        return out

    def to(self, device: Any) -> "Batch":
        """A copy with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)


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


def imitation_rows(scores: Sequence[float], reduction: str) -> list[int]:
    """The responses the imitation loss trains. "token" (rmkit's): the unique top-scored one,
    none on a tie. "sequence" (the paper's, Linear95/DSP trainer.py): every response whose score
    passes 0.85 of the top (score / (max + 1e-5) > 0.85), so tied top responses are all trained."""
    if reduction not in IMITATION_REDUCTIONS:
        raise ValueError(f"reduction must be one of {IMITATION_REDUCTIONS}, got {reduction!r}")
    if reduction == "token":
        best = preferred_index(scores)
        return [] if best is None else [best]
    top = max(scores)
    if top <= 0:  # the paper's scores are >= 0; below that, take the responses tied at the top
        return [j for j, s in enumerate(scores) if s == top]
    return [j for j, s in enumerate(scores) if s / (top + 1e-5) > PAPER_TARGET_RATIO]


def group_shared(encoded: Sequence[EncodedRecord], reduction: str = "token"
                 ) -> tuple[list[Group], list[int]]:
    """Merge records with identical prompt ids into groups in which each distinct response
    (by token ids) appears once. Returns the groups (in order of first appearance) and, for
    every input response in order, its index in the reward vector (groups laid end to end).

    Every pair, and every imitation target (`imitation_rows` under `reduction`), of every
    record is kept with its multiplicity, so losses and accuracies equal the record-by-record
    ones. DSP's four pairs of a query (one preferred response against each other) become one
    group of five responses: 5 rows instead of 8.
    """
    groups: list[Group] = []
    by_prompt: dict[tuple[int, ...], int] = {}
    index: list[dict[tuple[int, ...], int]] = []
    local: list[tuple[int, int]] = []  # (group, response index in the group) per input response
    for enc in encoded:
        key = tuple(enc.prompt_ids)
        g = by_prompt.get(key)
        if g is None:
            g = by_prompt[key] = len(groups)
            groups.append(Group(list(enc.prompt_ids), [], [], [], 0))
            index.append({})
        grp, seen = groups[g], index[g]
        ids = []
        for resp in enc.response_ids:
            k = tuple(resp)
            if k not in seen:
                seen[k] = len(grp.responses)
                grp.responses.append(list(resp))
                grp.targets.append(0)
            ids.append(seen[k])
            local.append((g, seen[k]))
        grp.pairs += [(ids[a], ids[b]) for a, b in strict_pairs(enc.scores)]
        for j in imitation_rows(enc.scores, reduction):
            grp.targets[ids[j]] += 1
        grp.truncated += int(enc.truncated)
    offsets = [0]
    for grp in groups:
        offsets.append(offsets[-1] + len(grp.responses))
    return groups, [offsets[g] + j for g, j in local]


class _Targets:
    """Imitation targets as (row, predicting position, token) -> raw weight, normalised once
    at the end: "token" reduction = every target token of the batch weighs the same;
    "sequence" = each target sequence's mean NLL, then the mean over sequences."""

    def __init__(self, reduction: str) -> None:
        self.reduction = reduction
        self.weights: dict[tuple[int, int, int], float] = {}
        self.total = 0.0

    def add(self, prompt: list[int], resp: list[int], whole: bool, count: int, place: Any) -> None:
        """One target sequence (row = prompt + resp) trained `count` times; place(v) maps a
        position v of that row to (row, position) in the batch."""
        seq = prompt + resp
        first = 1 if whole else max(len(prompt), 1)  # a row's first token has no predictor
        n = len(seq) - first
        if n <= 0 or count <= 0:
            return
        w = float(count) if self.reduction == "token" else count / n
        self.total += count * n if self.reduction == "token" else count
        for t in range(first, len(seq)):
            key = (*place(t - 1), seq[t])
            self.weights[key] = self.weights.get(key, 0.0) + w

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = sorted(self.weights)
        index = torch.tensor([k[:2] for k in keys], dtype=torch.long).reshape(-1, 2)
        token = torch.tensor([k[2] for k in keys], dtype=torch.long)
        weight = torch.tensor([self.weights[k] / self.total for k in keys], dtype=torch.float32)
        return index, token, weight


def collate(encoded: Sequence[EncodedRecord], pad_id: int, padding_side: str = "right",
            lm_target: str = "none", rows: str = "all", layout: str = "rows",
            reduction: str = "token") -> Batch:
    """Pad the distinct responses of several records into one batch; L = the longest row.

    Records sharing a prompt are merged first (`group_shared`): each distinct response is one
    row, every pair of every record kept. lm_target marks the imitation targets of each
    record's `imitation_rows`: "response" = its response tokens, "whole" = prompt + response
    tokens (the paper's setting), "none" = no targets; a row's first token is never a target
    (nothing predicts it). reduction: "token" = the mean NLL over every target token of the
    batch, "sequence" = each target's mean NLL, averaged over targets (the paper's).
    rows="preferred" keeps only target rows (plain LM training, BLT); pairs are then dropped.
    position_ids = cumsum(mask) - 1 clamped at 0, so left and right padding give equal positions.

    Example (pad_id=0, padding_side="right", lm_target="response"):
      record 0: prompt [5, 6], responses [[7], [8, 9]], scores (1, 0)
      record 1: prompt [5], responses [[3], [4, 4], [2]], scores (2, 1, 1)
    gives
      input_ids      [[5, 6, 7, 0], [5, 6, 8, 9], [5, 3, 0, 0], [5, 4, 4, 0], [5, 2, 0, 0]]
      attention_mask [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
      position_ids   [[0, 1, 2, 2], [0, 1, 2, 3], [0, 1, 1, 1], [0, 1, 2, 2], [0, 1, 1, 1]]
      record_index   [0, 0, 1, 1, 1]
      better [0, 2, 2], worse [1, 3, 4]       (rows 3 and 4 tie: no pair)
      lm_index [[0, 1], [2, 0]], lm_token [7, 3], lm_weight [0.5, 0.5]
      n_tokens 14, n_truncated 0
    With padding_side="left" row 0 becomes input_ids [0, 5, 6, 7], mask [0, 1, 1, 1],
    positions [0, 0, 1, 2] (and its target is predicted from position 2).

    layout="packed" or "flat" (rows="all" only) gives the prefix-sharing layouts of `collate_packed`.
    """
    _check(padding_side, lm_target)
    if rows not in ROW_MODES:
        raise ValueError(f"rows must be one of {ROW_MODES}, got {rows!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout != "rows" and rows == "all":
        return collate_packed(encoded, pad_id, padding_side, lm_target, reduction, flat=layout == "flat")
    groups, reward_of = group_shared(encoded, reduction)

    seqs: list[list[int]] = []
    owners: list[tuple[int, int]] = []  # (group, response) per row
    better: list[int] = []
    worse: list[int] = []
    row_of: dict[tuple[int, int], int] = {}
    for g, grp in enumerate(groups):
        for j, resp in enumerate(grp.responses):
            if rows == "all" or grp.targets[j]:
                row_of[(g, j)] = len(seqs)
                seqs.append(grp.prompt_ids + resp)
                owners.append((g, j))
        if rows == "all":
            base = row_of[(g, 0)] if grp.responses else 0
            better += [base + a for a, _ in grp.pairs]
            worse += [base + b for _, b in grp.pairs]

    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = _Targets(reduction)
    for i, seq in enumerate(seqs):
        start = 0 if padding_side == "right" else width - len(seq)
        input_ids[i, start:start + len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, start:start + len(seq)] = 1
        g, j = owners[i]
        if lm_target != "none":
            grp = groups[g]
            targets.add(grp.prompt_ids, grp.responses[j], lm_target == "whole", grp.targets[j],
                        lambda v, i=i, start=start: (i, start + v))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    lm_index, lm_token, lm_weight = targets.tensors()
    if rows != "all":
        reward_of = []
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        record_index=torch.tensor([g for g, _ in owners], dtype=torch.long),
        better=torch.tensor(better, dtype=torch.long),
        worse=torch.tensor(worse, dtype=torch.long),
        reward_of=torch.tensor(reward_of, dtype=torch.long),
        lm_index=lm_index, lm_token=lm_token, lm_weight=lm_weight,
        n_tokens=int(attention_mask.sum()),
        n_truncated=sum(groups[g].truncated for g in {g for g, _ in owners}),
    )


def _check(padding_side: str, lm_target: str) -> None:
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if lm_target not in LM_TARGETS:
        raise ValueError(f"lm_target must be one of {LM_TARGETS}, got {lm_target!r}")


def packed_length(enc: EncodedRecord | Group) -> int:
    """Tokens of a block [prompt][resp_1]...[resp_k]: the prompt once plus each response listed
    (a Group lists each distinct response once, so this is its block in `collate_packed`). What
    packing costs and what training and scoring sort their batches by when prefix sharing is on."""
    responses = enc.responses if isinstance(enc, Group) else enc.response_ids
    return len(enc.prompt_ids) + sum(len(r) for r in responses)


def bin_pack(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: item indices per row, no row longer than `width` (ties keep
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
                   lm_target: str = "none", reduction: str = "token", flat: bool = False) -> Batch:
    """Each group (records sharing a prompt, `group_shared`) as one block
    [prompt][resp_1][resp_2]..., blocks packed into rows no longer than the longest block
    (first-fit decreasing).

    The prompt is computed once instead of once per response, and short groups share a row
    instead of padding. The model builds the attention mask from segment_ids (a prompt is
    causal; a response sees its own group's prompt and itself, nothing else) and position_ids
    restart after the prompt for every response, so each response's hidden states equal those
    of its own unshared row. The reward vector, pairs, reward_of and the imitation targets mean
    what they mean in `collate`: a response's first token is predicted from its prompt's last
    position, which several target responses then share.

    segment_ids: r (>= 0) on response r's tokens, -2 - g on group g's prompt, -1 on padding.
    response_end[r] = (row, position) of response r's last token (of its prompt's last token,
    for an empty response).

    flat=True: every block end to end in one row, in group order, no padding (padding_side has
    nothing to do), and `spans` for span attention (rmkit/attention.py): per group, its prompt and
    first response as one causal span (q0, q1, q0, q0), then each further non-empty response as
    (start, end, prompt start, prompt end). The records above give one row
    [5, 6, 7, 8, 9, 5, 3, 4, 4, 2] with spans [[0, 3, 0, 0], [3, 5, 0, 2], [5, 7, 5, 5],
    [7, 9, 5, 6], [9, 10, 5, 6]].

    Example (pad_id=0, padding_side="right", lm_target="response"), the records of `collate`
    (blocks of 5 tokens each: one per row):
      input_ids    [[5, 6, 7, 8, 9], [5, 3, 4, 4, 2]]
      segment_ids  [[-2, -2, 0, 1, 1], [-3, 2, 3, 3, 4]]
      position_ids [[0, 1, 2, 2, 3], [0, 1, 1, 2, 1]]
      lm_index [[0, 1], [1, 0]], lm_token [7, 3]
      response_end [[0, 2], [0, 4], [1, 1], [1, 3], [1, 4]]
      better [0, 2, 2], worse [1, 3, 4]; n_tokens 10 (14 unshared)
    """
    _check(padding_side, lm_target)
    groups, reward_of = group_shared(encoded, reduction)
    blocks: list[tuple[list[int], list[int], list[int]]] = []  # ids, segments, positions
    starts: list[list[int]] = []  # per group: offset of each response in its block
    ends: list[tuple[int, int]] = []  # (group, offset in its block)
    record_index: list[int] = []
    better: list[int] = []
    worse: list[int] = []
    for g, grp in enumerate(groups):
        prompt = grp.prompt_ids
        p = len(prompt)
        seq, seg, pos = list(prompt), [-2 - g] * p, list(range(p))
        better += [len(record_index) + a for a, _ in grp.pairs]
        worse += [len(record_index) + b for _, b in grp.pairs]
        starts.append([])
        for resp in grp.responses:
            start = len(seq)
            starts[-1].append(start)
            seq += resp
            seg += [len(record_index)] * len(resp)
            pos += range(p, p + len(resp))
            ends.append((g, start + len(resp) - 1 if resp else p - 1))
            record_index.append(g)
        blocks.append((seq, seg, pos))

    lengths = [len(b[0]) for b in blocks]
    width = sum(lengths) if flat else max(lengths, default=0)
    rows = [list(range(len(blocks)))] if flat else bin_pack(lengths, width)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    where: dict[int, tuple[int, int]] = {}  # group -> (row, column of its first token)
    for r, members in enumerate(rows):
        col = 0 if padding_side == "right" else width - sum(lengths[i] for i in members)
        for i in members:
            seq, seg, pos = blocks[i]
            at = slice(col, col + len(seq))
            input_ids[r, at] = torch.tensor(seq, dtype=torch.long)
            segment_ids[r, at] = torch.tensor(seg, dtype=torch.long)
            position_ids[r, at] = torch.tensor(pos, dtype=torch.long)
            where[i] = (r, col)
            col += len(seq)
    targets = _Targets(reduction)
    if lm_target != "none":
        for g, grp in enumerate(groups):
            row, col = where[g]
            p = len(grp.prompt_ids)
            for j, resp in enumerate(grp.responses):
                def place(v: int, row: int = row, col: int = col, start: int = starts[g][j], p: int = p
                          ) -> tuple[int, int]:
                    return row, col + (v if v < p else start + v - p)
                targets.add(grp.prompt_ids, resp, lm_target == "whole", grp.targets[j], place)
    lm_index, lm_token, lm_weight = targets.tensors()
    response_end = torch.tensor([(where[g][0], where[g][1] + off) for g, off in ends],
                                dtype=torch.long).reshape(-1, 2)
    attention_mask = (segment_ids != -1).long()
    spans = None
    if flat:
        items: list[tuple[int, int, int, int]] = []
        for g, grp in enumerate(groups):
            a, p = where[g][1], len(grp.prompt_ids)
            for j, resp in enumerate(grp.responses):
                q0, q1 = a + starts[g][j], a + starts[g][j] + len(resp)
                if j == 0:
                    if q1 > a:  # the prompt, then its first response
                        items.append((a, q1, a, a))
                elif resp:
                    items.append((q0, q1, a, a + p))
            if not grp.responses and p:
                items.append((a, a + p, a, a))
        spans = torch.tensor(items, dtype=torch.long).reshape(-1, 4)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        record_index=torch.tensor(record_index, dtype=torch.long),
        better=torch.tensor(better, dtype=torch.long),
        worse=torch.tensor(worse, dtype=torch.long),
        reward_of=torch.tensor(reward_of, dtype=torch.long),
        lm_index=lm_index, lm_token=lm_token, lm_weight=lm_weight,
        n_tokens=int(attention_mask.sum()),
        n_truncated=sum(grp.truncated for grp in groups),
        segment_ids=segment_ids,
        response_end=response_end,
        spans=spans,
    )


def choose_layout(encoded: Sequence[EncodedRecord], prefix_sharing: bool, span_attention: bool,
                  device_type: str, attention_scale: float = DEFAULT_ATTENTION_SCALE) -> str:
    """The layout of one batch, the same rule for training, eval, scoring and serving.

    Without prefix sharing: "rows". On a CPU whose model runs span attention: "flat", which
    computes exactly the distinct tokens (no padding, no repeated prompt) and only the query-key
    pairs inside each span, so it costs no more than either other layout for any batch. Elsewhere
    (GPU, or a model whose attention cannot take spans): "packed" or "rows", whichever
    `packing_pays` says costs less. The flat layout runs one attention call per response and
    layer; on a GPU those are small kernel launches, where the packed layout's one masked call
    per layer is the measured path, so the flat layout stays a CPU layout until measured there.
    """
    if not prefix_sharing or not encoded:
        return "rows"
    if span_attention and device_type == "cpu":
        return "flat"
    return "packed" if packing_pays(encoded, attention_scale) else "rows"


def packing_pays(encoded: Sequence[EncodedRecord], attention_scale: float = DEFAULT_ATTENTION_SCALE) -> bool:
    """Whether the packed layout costs less compute than one row per response for this batch.

    Both layouts compute each group's distinct responses once (`group_shared`). Cost of a
    padded [rows, L] batch ~ rows * L * (1 + L / attention_scale): the per-token
    matmuls plus attention, which grows with L. Packing removes the repeated prompts and most
    padding (short records share a row) but makes rows longer (a whole record per block), and
    masked attention still computes the whole L x L score matrix. attention_scale = per-token
    matmul FLOPs / per-token-pair attention FLOPs (`RewardModel.attention_scale`); a few
    thousand for 100M+ models.
    """
    if not encoded:
        return False
    groups, _ = group_shared(encoded)
    plain = max(len(g.prompt_ids) + len(r) for g in groups for r in g.responses)
    lengths = [packed_length(g) for g in groups]
    width = max(lengths)
    rows = sum(len(g.responses) for g in groups)

    def cost(n: int, length: int) -> float:
        return n * length * (1.0 + length / attention_scale)

    return cost(len(bin_pack(lengths, width)), width) < cost(rows, plain)

