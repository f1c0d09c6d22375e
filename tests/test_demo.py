"""`rmkit demo`: its refusals and its table (the demo's effect itself is a benchmark figure, in the
README and docs/results.md, never a timed test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rmkit.console import console


def test_demo_refuses_output_dir_override(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "rmkit", "demo", "--out", str(tmp_path / "d"),
                          "--set", "train.output_dir=elsewhere"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "rmkit demo places its runs itself: --set train.output_dir is not allowed" in res.stderr
    assert "choose the folder with --out DIR" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "d").exists()  # refused before anything is written


def test_demo_table_shows_intervals_and_the_paired_difference() -> None:
    def res(acc: float, lo: float, hi: float, diff: dict | None) -> dict:
        return {"accuracy": acc, "accuracy_ci": [lo, hi], "diff_vs_first": diff}

    report = {
        "sets": {"general": {"pairs": 128, "prompts": 128, "length_baseline": {"value": 0.5625, "lo": 0.48, "hi": 0.65}},
                 "business": {"pairs": 128, "prompts": 32, "length_baseline": {"value": 0.578, "lo": 0.5, "hi": 0.66}}},
        "checkpoints": [
            {"results": {"general": res(0.625, 0.54, 0.7, None), "business": res(0.4375, 0.36, 0.52, None)}},
            {"results": {"general": res(0.5, 0.41, 0.59, {"value": -0.125, "lo": -0.2, "hi": -0.05}),
                         "business": res(0.7266, 0.65, 0.8, {"value": 0.2891, "lo": 0.2, "hi": 0.375})}},
        ],
    }
    stage = {"seconds": 60.0, "steps": 4, "pairs": 64, "tokens_per_s": 1.0, "first_loss": 0.7, "last_loss": 0.5}
    result = {"domain": "business", "eval": report, "eval_seconds": 20.0, "total_seconds": 300.0, "out": "runs/demo",
              "stages": [dict(stage, stage=s) for s in ("blt", "grft", "crft")]}
    from rmkit.demo import _table

    with console.capture() as cap:
        _table(result)
    text = cap.get()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text  # 80 columns, nothing cut
    assert "43.8 [36.0, 52.0]" in text and "72.7 [65.0, 80.0]" in text  # GRFT and CRFT on business
    assert "-12.5 [-20.0, -5.0]" in text and "+28.9 [20.0, 37.5]" in text  # CRFT - GRFT, general and business
    assert "57.8 [50.0, 66.0]" in text  # the length baseline
    assert "0.70->0.50" in text and "(128 pairs, 32 queries)" in text
    assert text.count("BLT") == 2  # its row and "BLT: LM loss" in the note

    result["stages"] = result["stages"][1:]  # the default demo: no BLT
    with console.capture() as cap:
        _table(result)
    assert "BLT" not in cap.get() and "43.8 [36.0, 52.0]" in cap.get()
    assert "Trained on 64 GRFT and 64 CRFT pairs; total 300 s" in " ".join(cap.get().split())


def test_loss_ends_average_disjoint_ends() -> None:
    from rmkit.demo import loss_ends

    assert loss_ends([3.0, 2.0]) == (3.0, 2.0)  # 2 steps: step 1 against step 2
    assert loss_ends([0.9, 0.6, 0.9, 0.3, 0.6, 0.3, 0.6, 0.3]) == pytest.approx((0.8, 0.4), abs=1e-12)  # 8 steps: 3 at each end
    assert loss_ends([1.0, 0.5, 0.25]) == (1.0, 0.25)  # 3 steps: k = 1, the middle step is in neither
    assert loss_ends([0.7]) == (0.7, 0.7)
