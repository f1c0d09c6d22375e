"""Uncertainty of preference accuracies: a bootstrap over prompts, pure numpy.

Pairs are not independent draws: the pairs of one prompt (a DSP query's four pairs share the
preferred response; a ranked group yields several pairs) succeed or fail together, so a
bootstrap over pairs would give intervals that are too narrow. Every pair carries the id of its
cluster (records with the same prompt text form one cluster), whole clusters are resampled with
replacement, and a resample's accuracy is the sum of its clusters' correct pairs over the sum of
their pairs. The resample matrix is drawn once per set and shared by every column scored on it
(each model, the length baseline), so paired differences come from the same resamples and two
identical models differ by exactly 0. Percentile intervals; nothing here re-scores a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
LEVEL = 0.95
CHUNK_CELLS = 4_000_000  # resample-matrix cells held at once (32 MB of float64), whatever the set size


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its percentile interval (all fractions)."""

    value: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}


@dataclass(frozen=True)
class Bootstrap:
    """Per column (e.g. one model each) its accuracy, and its paired difference with column 0."""

    accuracy: list[Estimate]
    diff: list[Estimate]  # column k minus column 0, from the same resamples; diff[0] is all zeros
    pairs: int
    clusters: int
    resamples: int
    seed: int
    level: float


def cluster_ids(keys: Iterable[Hashable]) -> np.ndarray:
    """One integer per item, equal for equal keys, numbered in order of first appearance."""
    seen: dict[Hashable, int] = {}
    return np.array([seen.setdefault(k, len(seen)) for k in keys], dtype=np.int64)


def resample_counts(n_clusters: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n_clusters] matrix: how often each cluster is drawn in each resample.

    Row b is `bincount(rng.integers(0, n, n))`: n clusters drawn with replacement. The counts
    (not the drawn indices) are what a ratio of sums needs, and one matrix product then scores
    every column at once."""
    idx = rng.integers(0, n_clusters, size=(n_resamples, n_clusters))
    flat = idx + np.arange(n_resamples, dtype=np.int64)[:, None] * n_clusters
    return np.bincount(flat.ravel(), minlength=n_resamples * n_clusters).reshape(n_resamples, n_clusters)


def resampled_ratios(counts: np.ndarray, numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """[B, M] ratio of sums per resample: counts [B, n] @ numerators [n, M] over counts @ denominators [n].
    Integer counts below 2**53 are summed exactly in float64, so equal columns give equal ratios."""
    c = counts.astype(np.float64)
    return (c @ numerators) / (c @ denominators)[:, None]


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentile of each column of samples [B, M] (numpy's linear interpolation)."""
    tail = round(50 * (1 - level), 9)  # 2.5 exactly for 0.95 (1 - 0.95 is not 0.05 in binary)
    lo, hi = np.percentile(samples, [tail, 100 - tail], axis=0)
    return lo, hi


def clustered_bootstrap(clusters: Sequence[int] | np.ndarray, outcomes: np.ndarray,
                        n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                        level: float = LEVEL) -> Bootstrap:
    """Accuracy with an interval for each column of outcomes [pairs, M] (1 = ranked right), and
    each column's difference with column 0, resampling whole clusters (`clusters`: one id per
    pair, 0..n-1). The generator is seeded per call, so a set's interval does not depend on which
    other sets or how many models were evaluated beside it."""
    ids = np.asarray(clusters, dtype=np.int64)
    out = np.asarray(outcomes, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    if out.shape[0] != ids.shape[0]:
        raise ValueError(f"{ids.shape[0]} cluster ids for {out.shape[0]} pairs")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    m = out.shape[1]
    if ids.size == 0:
        nan = Estimate(float("nan"), float("nan"), float("nan"))
        return Bootstrap([nan] * m, [nan] * m, 0, 0, n_resamples, seed, level)
    _, ids = np.unique(ids, return_inverse=True)  # dense 0..n-1, whatever ids were given
    n = int(ids.max()) + 1
    num = np.zeros((n, m))
    np.add.at(num, ids, out)
    den = np.bincount(ids, minlength=n).astype(np.float64)

    rng = np.random.default_rng(seed)
    rows = max(1, CHUNK_CELLS // n)
    acc = np.concatenate([resampled_ratios(resample_counts(n, min(rows, n_resamples - start), rng), num, den)
                          for start in range(0, n_resamples, rows)])
    point = num.sum(axis=0) / den.sum()
    lo, hi = percentile_interval(acc, level)
    d_lo, d_hi = percentile_interval(acc - acc[:, :1], level)
    d_point = point - point[0]
    return Bootstrap([Estimate(float(point[k]), float(lo[k]), float(hi[k])) for k in range(m)],
                     [Estimate(float(d_point[k]), float(d_lo[k]), float(d_hi[k])) for k in range(m)],
                     int(ids.size), n, n_resamples, seed, level)


def strict_json(value: Any) -> Any:
    """The value with every non-finite float (NaN, inf) replaced by None, recursively, so
    `json.dumps` writes strict JSON (`null`) instead of the non-standard `NaN`."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
