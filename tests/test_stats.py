"""The prompt-clustered bootstrap (rmkit.stats): exact cases worked out by hand, no model.

Hand case used below: clusters A (2 pairs, both right), B (1 pair, wrong), C (1 pair, right).
A resample of 3 clusters drawn with counts (a, b, c) has accuracy (2a + c) / (2a + b + c). The
27 equally likely ordered draws, sorted, give accuracies 0 (once), 1/3 (3x), 1/2 (3x), 2/3 (3x),
3/4 (6x), 4/5 (3x) and 1 (8x); numpy's linear percentile puts the 2.5th at position
0.025 * 26 = 0.65, between 0 and 1/3: 0.65 / 3; the 97.5th at position 25.35, between two 1s: 1.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from rmkit import stats
from rmkit.stats import (
    Estimate,
    cluster_ids,
    clustered_bootstrap,
    percentile_interval,
    resample_counts,
    resampled_ratios,
    strict_json,
)

HAND_NUM = np.array([[2.0], [0.0], [1.0]])  # right pairs of clusters A, B, C
HAND_DEN = np.array([2.0, 1.0, 1.0])  # their pairs


def test_cluster_ids_number_keys_in_order_of_first_appearance() -> None:
    assert cluster_ids(["q2", "q1", "q2", "q3", "q1"]).tolist() == [0, 1, 0, 2, 1]
    assert cluster_ids([]).tolist() == []


def test_resample_counts_count_the_drawn_indices_row_by_row() -> None:
    counts = resample_counts(4, 5, np.random.default_rng(3))
    drawn = np.random.default_rng(3).integers(0, 4, size=(5, 4))
    assert counts.tolist() == [np.bincount(row, minlength=4).tolist() for row in drawn]
    assert counts.sum(axis=1).tolist() == [4] * 5  # n clusters drawn per resample


def test_resampled_ratio_is_a_ratio_of_sums() -> None:
    counts = np.array([[3, 0, 0], [0, 3, 0], [1, 1, 1], [2, 1, 0], [0, 1, 2]])
    got = resampled_ratios(counts, HAND_NUM, HAND_DEN)[:, 0]
    assert got.tolist() == [1.0, 0.0, 3 / 4, 4 / 5, 2 / 3]


def test_percentile_interval_of_the_enumerated_bootstrap_distribution() -> None:
    draws = np.array(list(itertools.product(range(3), repeat=3)))  # all 27 ordered draws of 3 clusters
    counts = np.stack([np.bincount(d, minlength=3) for d in draws])
    acc = resampled_ratios(counts, HAND_NUM, HAND_DEN)
    assert sorted(acc[:, 0].tolist()).count(1.0) == 8 and sorted(acc[:, 0].tolist())[:2] == [0.0, 1 / 3]
    lo, hi = percentile_interval(acc)
    assert lo[0] == pytest.approx(0.65 / 3, abs=1e-12) and hi[0] == 1.0


def test_clustered_bootstrap_on_the_hand_case() -> None:
    """Pairs of A, A, B, C; 2000 resamples: 0 has probability 1/27 (~74 of 2000), 1 has 8/27."""
    b = clustered_bootstrap([0, 0, 1, 2], np.array([1, 1, 0, 1]), n_resamples=2000, seed=0)
    assert b.accuracy == [Estimate(0.75, 0.0, 1.0)]
    assert (b.pairs, b.clusters, b.resamples, b.seed, b.level) == (4, 3, 2000, 0, 0.95)


def test_clustered_bootstrap_is_the_shared_resample_matrix_step_by_step() -> None:
    """Drawn once per set from default_rng(seed): the same numbers by hand, for every column."""
    ids = [0, 0, 1, 2, 2, 2, 3]
    out = np.array([[1, 0], [1, 1], [0, 0], [1, 1], [0, 1], [1, 1], [0, 1]], dtype=float)
    b = clustered_bootstrap(ids, out, n_resamples=300, seed=7)
    num = np.array([[2, 1], [0, 0], [2, 3], [0, 1]], dtype=float)
    acc = resampled_ratios(resample_counts(4, 300, np.random.default_rng(7)), num, np.array([2.0, 1, 3, 1]))
    lo, hi = np.percentile(acc, [2.5, 97.5], axis=0)
    (_, dlo), (_, dhi) = np.percentile(acc - acc[:, :1], [2.5, 97.5], axis=0)
    assert [(e.value, e.lo, e.hi) for e in b.accuracy] == [(4 / 7, lo[0], hi[0]), (5 / 7, lo[1], hi[1])]
    assert b.diff[0] == Estimate(0.0, 0.0, 0.0)
    assert (b.diff[1].value, b.diff[1].lo, b.diff[1].hi) == (5 / 7 - 4 / 7, dlo, dhi)


def test_memory_chunks_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    ids, out = rng.integers(0, 50, 200), rng.integers(0, 2, (200, 3))
    whole = clustered_bootstrap(ids, out, n_resamples=500, seed=4)
    monkeypatch.setattr(stats, "CHUNK_CELLS", 50 * 7)  # 7 resamples per chunk
    assert clustered_bootstrap(ids, out, n_resamples=500, seed=4) == whole


def test_a_model_that_ranks_every_pair_wrong_has_accuracy_0_and_interval_0_0() -> None:
    b = clustered_bootstrap([0, 0, 1, 2, 3, 3], np.zeros((6, 2)), n_resamples=2000)
    assert b.accuracy == [Estimate(0.0, 0.0, 0.0)] * 2
    b = clustered_bootstrap([0, 0, 1, 2, 3, 3], np.ones(6), n_resamples=2000)
    assert b.accuracy == [Estimate(1.0, 1.0, 1.0)]


def test_one_prompt_gives_a_degenerate_interval_at_the_point_estimate() -> None:
    """Every resample draws the one cluster once: all 2000 resamples are the point estimate."""
    b = clustered_bootstrap([5, 5, 5], np.array([1, 0, 1]), n_resamples=2000)
    assert b.accuracy == [Estimate(2 / 3, 2 / 3, 2 / 3)] and b.clusters == 1


def test_identical_models_differ_by_exactly_0_with_a_zero_width_interval() -> None:
    rng = np.random.default_rng(2)
    ids, same = rng.integers(0, 30, 120), rng.integers(0, 2, 120)
    other = same.copy()
    other[:40] = 1
    b = clustered_bootstrap(ids, np.stack([same, same, other], axis=1), n_resamples=2000, seed=0)
    assert b.accuracy[0] == b.accuracy[1] and b.accuracy[0].lo < b.accuracy[0].hi
    assert b.diff[1] == Estimate(0.0, 0.0, 0.0)
    assert b.diff[2].value > 0 and b.diff[2].lo > 0  # 40 pairs set right: a clear improvement
    # the paired interval is narrower than the two separate intervals would suggest
    assert b.diff[2].hi - b.diff[2].lo < (b.accuracy[2].hi - b.accuracy[2].lo) + (b.accuracy[0].hi - b.accuracy[0].lo)


def test_pairs_of_a_prompt_move_together_so_the_interval_is_wider_than_per_pair() -> None:
    """10 prompts of 4 pairs: 5 prompts all right, 5 all wrong. Resampling prompts is a
    Binomial(10, 1/2) / 10; resampling the 40 pairs as if independent would be far narrower."""
    ids = np.repeat(np.arange(10), 4)
    out = np.repeat(np.array([1, 0] * 5), 4)
    by_prompt = clustered_bootstrap(ids, out, n_resamples=2000).accuracy[0]
    by_pair = clustered_bootstrap(np.arange(40), out, n_resamples=2000).accuracy[0]
    assert by_prompt.value == by_pair.value == 0.5
    assert (by_prompt.lo, by_prompt.hi) == (0.2, 0.8)  # Binomial(10, .5): 2.5th/97.5th percentiles 2 and 8
    assert by_pair.hi - by_pair.lo < 0.35


def test_same_seed_same_interval_other_seed_other_draws() -> None:
    rng = np.random.default_rng(0)
    ids, out = rng.integers(0, 40, 160), rng.integers(0, 2, 160)
    assert clustered_bootstrap(ids, out, seed=3) == clustered_bootstrap(ids, out, seed=3)
    a, b = clustered_bootstrap(ids, out, seed=3), clustered_bootstrap(ids, out, seed=4)
    assert a.accuracy[0].value == b.accuracy[0].value and (a.accuracy[0].lo, a.accuracy[0].hi) != (b.accuracy[0].lo, b.accuracy[0].hi)


def test_a_set_without_pairs_has_no_estimate() -> None:
    b = clustered_bootstrap([], np.zeros((0, 2)))
    assert b.pairs == 0 and all(math.isnan(e.value) and math.isnan(e.lo) for e in b.accuracy)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="3 cluster ids for 2 pairs"):
        clustered_bootstrap([0, 1, 2], np.zeros(2))
    with pytest.raises(ValueError, match="at least 1"):
        clustered_bootstrap([0], np.zeros(1), n_resamples=0)


def _refuse(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def test_strict_json_writes_null_for_every_non_finite_float() -> None:
    report = {"a": float("nan"), "b": [1.0, float("inf"), {"c": np.float64("nan")}], "d": (0.5, None), "e": "NaN"}
    text = json.dumps(strict_json(report))
    assert json.loads(text, parse_constant=_refuse) == {"a": None, "b": [1.0, None, {"c": None}], "d": [0.5, None],
                                                        "e": "NaN"}
    with pytest.raises(ValueError, match="NaN"):
        json.loads(json.dumps(report), parse_constant=_refuse)  # what json.dumps does without it


def test_stats_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, rmkit.stats; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
