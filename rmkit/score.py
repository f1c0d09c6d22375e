"""Batched reward scoring of canonical records, shared by the training loop and `rmkit eval`.

Records are encoded once; batches are grouped by length; every rank scores its shard and all
ranks run the same number of forwards (ZeRO-3 gathers parameters collectively per forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rmkit.data.collate import DEFAULT_ATTENTION_SCALE, EncodedRecord, choose_layout, collate, group_shared, packed_length
from rmkit.data.records import preferred_index, strict_pairs, tied_pairs
from rmkit.loss import pair_correct


@dataclass
class SetResult:
    """Figures for one eval set: accuracy over pairs (ties excluded; a pair is right by
    `loss.pair_correct`, as in training), margins, groups."""

    correct: int = 0
    pairs: int = 0
    ties_skipped: int = 0
    margin_sum: float = 0.0
    groups: int = 0
    groups_all_correct: int = 0
    groups_top2_correct: int = 0
    length_correct: int = 0
    truncated: int = 0
    records: int = 0

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.correct, self.pairs, self.ties_skipped, self.margin_sum, self.groups,
                             self.groups_all_correct, self.groups_top2_correct, self.length_correct,
                             self.truncated, self.records], dtype=torch.float64)

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "SetResult":
        v = t.tolist()
        return SetResult(int(v[0]), int(v[1]), int(v[2]), float(v[3]), int(v[4]), int(v[5]), int(v[6]),
                         int(v[7]), int(v[8]), int(v[9]))

    @property
    def accuracy(self) -> float:
        return self.correct / self.pairs if self.pairs else float("nan")

    def summary(self) -> dict[str, float]:
        p = max(1, self.pairs)
        g = max(1, self.groups)
        return {"accuracy": self.accuracy, "pairs": self.pairs, "mean_margin": self.margin_sum / p,
                "length_baseline": self.length_correct / p if self.pairs else float("nan"),
                "ties_skipped": self.ties_skipped, "truncated": self.truncated, "records": self.records,
                "group_all_pairs_acc": self.groups_all_correct / g if self.groups else float("nan"),
                "group_top2_acc": self.groups_top2_correct / g if self.groups else float("nan")}


def tally(result: SetResult, enc: EncodedRecord, rewards: list[float], char_lengths: list[int]) -> None:
    """Add one record's rewards to the running figures."""
    scores = enc.scores
    n = len(scores)
    result.records += 1
    result.truncated += int(enc.truncated)
    all_ok = True
    for i, j in strict_pairs(scores):
        result.pairs += 1
        ok = pair_correct(rewards[i], rewards[j])
        result.correct += int(ok)
        all_ok &= ok
        result.margin_sum += rewards[i] - rewards[j]
        result.length_correct += int(char_lengths[i] > char_lengths[j])
    result.ties_skipped += len(tied_pairs(scores))
    if n > 2:
        result.groups += 1
        result.groups_all_correct += int(all_ok)
        best = preferred_index(scores)
        if best is not None:  # a shared top has no "best vs runner-up" pair
            second = max((k for k in range(n) if k != best), key=lambda k: scores[k])
            result.groups_top2_correct += int(pair_correct(rewards[best], rewards[second]))


MAX_UNIT = 16  # records per prompt unit: whole-text encodings of unrelated texts may share only a BOS


def prompt_units(encoded: list[EncodedRecord], max_unit: int = MAX_UNIT) -> list[list[int]]:
    """Record indices grouped by identical prompt ids (first appearance order), at most
    `max_unit` records each: the unit a scoring batch never splits, so each distinct response
    of a prompt is computed once."""
    units: dict[tuple[int, ...], list[int]] = {}
    for i, enc in enumerate(encoded):
        units.setdefault(tuple(enc.prompt_ids), []).append(i)
    return [u[k:k + max_unit] for u in units.values() for k in range(0, len(u), max_unit)]


@torch.no_grad()
def score_shard(model: torch.nn.Module, encoded: list[EncodedRecord], batch_size: int, pad_id: int,
                padding_side: str, rank: int, world: int, device: torch.device,
                progress: Callable[[int], None] | None = None,
                prefix_sharing: bool = True) -> list[tuple[int, list[float]]]:
    """Score this rank's share of records; returns (record index, rewards). Records sharing a
    prompt are scored together, each distinct response once (`collate` groups them), and a
    batch holds `batch_size` such prompt units. Every rank makes the same number of forward
    calls (short ranks repeat a batch and drop its output). Rewards stay on the device until
    one transfer at the end; `progress(n)` is told after each batch of n records. With
    `prefix_sharing` each batch takes the layout `choose_layout` picks (on a CPU: flat, one
    unpadded row; else packed [prompt][resp_1]... blocks when that costs less); rewards are the
    same in every layout. Batches are grouped by the length of the row that costs: the packed
    block, or the longest response row."""
    units = prompt_units(encoded)

    def length(unit: list[int]) -> int:
        if prefix_sharing:  # the unit's one block: its prompt once, each distinct response once
            groups, _ = group_shared([encoded[i] for i in unit])
            return sum(packed_length(g) for g in groups)
        return max(encoded[i].max_length() for i in unit)

    inner = getattr(model, "module", model)  # a DeepSpeed engine's module
    scale = float(getattr(inner, "attention_scale", DEFAULT_ATTENTION_SCALE))
    spans = bool(getattr(inner, "span_attention", False))
    cost = [length(u) for u in units]
    order = sorted(range(len(units)), key=lambda u: (-cost[u], u))
    batches = [[i for u in order[k:k + batch_size] for i in units[u]] for k in range(0, len(order), batch_size)]
    mine = batches[rank::world]
    n_calls = (len(batches) + world - 1) // world
    kept: list[torch.Tensor] = []
    for c in range(n_calls):
        ids = mine[c] if c < len(mine) else batches[0]
        encs = [encoded[i] for i in ids]
        batch = collate(encs, pad_id=pad_id, padding_side=padding_side,
                        layout=choose_layout(encs, prefix_sharing, spans, device.type, scale))
        res = model(**batch.model_inputs(device))
        if c >= len(mine):
            continue
        kept.append(res.rewards.detach().float()[batch.reward_of.to(res.rewards.device)])
        if progress is not None:
            progress(len(ids))
    rewards = torch.cat(kept).cpu().tolist() if kept else []
    out: list[tuple[int, list[float]]] = []
    pos = 0
    for ids in mine:
        for i in ids:
            k = len(encoded[i].response_ids)
            out.append((i, rewards[pos:pos + k]))
            pos += k
    return out
