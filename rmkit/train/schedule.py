"""Learning-rate schedule and the deterministic data order (both pure, both resumable)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def lr_lambda(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier on the peak lr at optimizer step `step` (0-based): linear warmup, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_records(step: int, n: int, global_batch: int, seed: int,
                 groups: Sequence[int] | None = None) -> list[int]:
    """The record indices of optimizer step `step`: a fresh seeded permutation each epoch, so the
    order depends only on (seed, step) and a resumed run sees exactly the same batches.

    groups[i] (records sharing a prompt share a group id, numbered by first appearance): the
    permutation is over groups, each group's records kept together in index order, so a DSP
    query's pairs meet in one batch and its shared responses are computed once. Without
    groups (or with every group a single record) the order is a permutation of records."""
    per_epoch = n // global_batch
    epoch, k = divmod(step, per_epoch)
    if groups is None:
        order = [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n)]
    else:
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        keys = list(members)
        perm = np.random.default_rng([seed, epoch]).permutation(len(keys))
        order = [i for p in perm for i in members[keys[int(p)]]]
    return order[k * global_batch:(k + 1) * global_batch]


def micro_batches(ids: list[int], lengths: list[int], micro: int, world: int, rank: int,
                  groups: Sequence[int] | None = None) -> list[list[int]]:
    """Split one global batch into this rank's micro-batches, grouped by length so each
    micro-batch pads only to its own longest row (and ranks get similar lengths). With
    `groups`, records of one group sort together (by the group's longest), so they tend to
    share a micro-batch."""
    if groups is None:
        ordered = sorted(ids, key=lambda i: (-lengths[i], i))
    else:
        longest: dict[int, int] = {}
        for i in ids:
            longest[groups[i]] = max(longest.get(groups[i], 0), lengths[i])
        ordered = sorted(ids, key=lambda i: (-longest[groups[i]], groups[i], i))
    accum = len(ordered) // (micro * world)
    return [ordered[(j * world + rank) * micro:(j * world + rank + 1) * micro] for j in range(accum)]


def total_steps(n: int, global_batch: int, epochs: float, max_steps: int | None) -> int:
    if max_steps is not None:
        return max_steps
    return max(1, int(epochs * n) // global_batch)
