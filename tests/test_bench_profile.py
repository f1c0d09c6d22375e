"""bench/throughput.py's --profile: operators grouped by what bounds MFU, shares per mode."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parent.parent / "bench" / "throughput.py"
_spec = importlib.util.spec_from_file_location("bench_throughput", _PATH)
tp = importlib.util.module_from_spec(_spec)
sys.modules["bench_throughput"] = tp
_spec.loader.exec_module(tp)


def test_operators_fall_in_the_groups_that_bound_mfu() -> None:
    assert tp.profile_group("aten::mm") == "matmuls"
    assert tp.profile_group("aten::addmm") == "matmuls"
    assert tp.profile_group("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention kernel"
    assert tp.profile_group("aten::copy_") == "copies, casts, concatenation"
    assert tp.profile_group("aten::cat") == "copies, casts, concatenation"
    assert tp.profile_group("aten::_fused_adamw_") == "optimizer"
    assert tp.profile_group("aten::mul") == "the rest"
    assert tp.profile_group("aten::mm_backward_helper") == "the rest"  # aten names match whole, not as prefixes


def test_profile_rows_give_each_groups_share_of_self_time_per_step() -> None:
    ops = [("aten::mm", 30, 2.0), ("aten::mul", 90, 1.0), ("aten::_fused_adamw_", 1, 0.5), ("aten::add", 5, 0.5)]
    runs = {"grft/rmkit": [{"profile": ops}, {"profile": [("aten::mm", 1, 9.0)]}], "grft/trl": [{"seconds": 1.0}]}
    rows = tp.profile_rows(runs, steps=2)
    assert rows == [["grft/rmkit", "2.00", "50%", "0%", "0%", "12%", "38%", "aten::mul 25%, aten::add 12%", ""]]
    assert len(rows[0]) == len(tp.PROFILE_COLUMNS)
    # 600 GFLOP of weight matmuls in the 2.0 self seconds of aten::mm: 300 GFLOP/s
    (row,) = tp.profile_rows(runs, steps=2, linear_flops=lambda run, mode: 600e9)
    assert row[-1] == "300"


def test_a_real_profile_counts_the_matmuls_it_ran() -> None:
    prof = tp.start_profile({"profile": True})
    a = torch.randn(256, 256)
    for _ in range(3):
        a = torch.mm(a, a).clamp(-1, 1)
    out = tp.stop_profile(prof)["profile"]
    counts = {key: count for key, count, _ in out}
    assert counts["aten::mm"] == 3 and counts["aten::clamp"] == 3
    assert all(sec > 0 for _, _, sec in out) and [o[2] for o in out] == sorted((o[2] for o in out), reverse=True)
    assert tp.start_profile({"profile": False}) is None and tp.stop_profile(None) == {}


def test_packed_rule_modes_run_at_their_own_micro_batch() -> None:
    """rmkit-packed: rmkit with the layout rule before span attention, side by side with rmkit."""
    assert tp.split_mode("crft/rmkit-packed@4") == ("crft/rmkit-packed", 4)
    assert "grft/rmkit-packed" in tp.MODES and tp.BASELINE["crft/rmkit-packed"] == "crft/original"
    assert "rmkit-packed" in tp.MICRO_MODES


def test_eval_bench_accuracy_carries_its_prompt_bootstrap_interval() -> None:
    from rmkit.data.records import Record

    path = Path(__file__).resolve().parent.parent / "bench" / "eval_throughput.py"
    spec = importlib.util.spec_from_file_location("bench_eval_throughput", path)
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    a = Record("a", ("x", "y"), (1.0, 0.0))
    b = Record("b", ("x", "y", "z"), (2.0, 1.0, 0.0))  # 3 pairs of one prompt: resampled together
    assert ev.accuracy_cell([a, b], [[1.0, 0.0], [3.0, 2.0, 1.0]]) == "1.000 [1.000, 1.000]"
    # a's pair right, b's three wrong: 1 of 4; resamples draw {a, a}, {a, b} or {b, b}: 1, 1/4, 0
    assert ev.accuracy_cell([a, b], [[1.0, 0.0], [1.0, 2.0, 3.0]]) == "0.250 [0.000, 1.000]"


def test_saved_tally_counts_what_each_micro_batch_keeps_for_backward() -> None:
    """--memory: per backward, the bytes autograd saved (parameters excluded) and the positions
    looked up, hand-counted; the patched functions are put back afterwards."""
    import torch.nn.functional as F

    real_backward, real_embedding = torch.Tensor.backward, F.embedding
    w = torch.nn.Parameter(torch.ones(4, 3))
    emb = torch.nn.Embedding(10, 4)
    with tp.track_saved(tp.SavedTally()) as tally:
        x = torch.randn(5, 4)  # no grad: mm keeps x (80 bytes) for w's gradient, not w
        (x @ w).relu().sum().backward()  # relu keeps its [5, 3] result: 60 bytes
        emb(torch.tensor([[1, 2, 3]])).sum().backward()  # embedding keeps its 3 int64 indices: 24 bytes
        with torch.no_grad():
            emb(torch.tensor([4, 5]))  # no grad: no positions
        tally.close()
    assert tally.micro_batches == [(140, 0), (24, 3)]
    assert tally.largest() == {"saved_mb": 140 / 2**20, "saved_positions": 0}
    assert torch.Tensor.backward is real_backward and F.embedding is real_embedding


def test_memory_rows_split_the_peak() -> None:
    runs = {"crft/rmkit": [{"peak_rss_mb": 4000.0, "saved_mb": 800.0, "saved_positions": 600}],
            "crft/original": [{"peak_rss_mb": 3900.0}]}  # no tally: no row
    assert tp.memory_rows(runs, 2000.0) == [["crft/rmkit", "4000", "2000", "800", "600", "1365", "1200"]]
