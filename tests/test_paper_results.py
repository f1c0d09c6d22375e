"""bench/paper_results.py's pure functions, on hand-computed cases (no training, no rmkit calls)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "paper_results.py"
_spec = importlib.util.spec_from_file_location("paper_results", _PATH)
pr = importlib.util.module_from_spec(_spec)
sys.modules["paper_results"] = pr
_spec.loader.exec_module(pr)


# ---- claim verdict from the paired interval ---------------------------------------------------------

@pytest.mark.parametrize("lo, hi, expect, want", [
    (0.01, 0.05, 1, "holds"),          # entirely above 0, claim says positive
    (-0.02, 0.03, 1, "not shown"),     # across 0
    (-0.05, -0.01, 1, "reversed"),     # entirely below 0
    (0.0, 0.04, 1, "not shown"),       # touching 0 is not beyond it
    (-0.04, 0.0, 1, "not shown"),
    (-0.05, -0.01, -1, "holds"),       # claim says negative (CRFT lowers general accuracy)
    (0.01, 0.05, -1, "reversed"),
    (-0.01, 0.01, -1, "not shown"),
    (0.0, 0.0, 1, "not shown"),        # identical models: exactly 0
])
def test_verdict(lo, hi, expect, want):
    assert pr.verdict(lo, hi, expect) == want


def test_verdict_missing_and_bad_sign():
    assert pr.verdict(None, 0.1) == "not run yet"
    assert pr.verdict(float("nan"), 0.1) == "not run yet"
    with pytest.raises(ValueError):
        pr.verdict(0.1, 0.2, 0)


# ---- staleness of a finished run: run.json vs HEAD and the current recipe ----------------------------

HEAD = "a" * 40
OLD = "b" * 40
SHA = "c" * 64


def info(commit=HEAD, sha=SHA):
    return {"git_commit": commit, "recipe_sha256": sha, "rmkit_version": "0.1.0"}


def test_fresh_when_same_commit_and_recipe():
    assert pr.stale_reason(info(), SHA, HEAD, lambda c: True) is None  # same commit: rmkit_changed not asked


def test_other_commit_without_rmkit_changes_is_fresh():
    asked = []
    assert pr.stale_reason(info(OLD), SHA, HEAD, lambda c: asked.append(c) or False) is None
    assert asked == [OLD]


def test_other_commit_with_rmkit_changes_is_stale():
    why = pr.stale_reason(info(OLD), SHA, HEAD, lambda c: True)
    assert why and "other code" in why and OLD[:10] in why


def test_unknown_commit_is_stale():
    assert "unknown" in pr.stale_reason(info(OLD), SHA, HEAD, lambda c: None)


def test_other_recipe_is_stale_even_on_the_same_commit():
    why = pr.stale_reason(info(sha="d" * 64), SHA, HEAD, lambda c: False)
    assert why and why.startswith("other settings") and "dddddddddddd" in why


def test_missing_records_are_stale():
    assert pr.stale_reason(None, SHA, HEAD, lambda c: False) == "no run.json"
    assert pr.stale_reason(info(commit=None), SHA, HEAD, lambda c: False) == "no git commit recorded"


def test_recipe_not_checked_when_unknown():  # eval caches carry no recipe: only the commit counts
    assert pr.stale_reason({"recipe_sha256": None, "git_commit": HEAD}, None, HEAD, lambda c: True) is None
    assert pr.stale_reason({"recipe_sha256": None, "git_commit": OLD}, None, HEAD, lambda c: True)


# ---- which rmkit files a study run depends on: the import closure of the commands it runs ---------------

def test_import_closure_follows_module_function_level_and_submodule_imports():
    src = {
        "rmkit/__init__.py": "",
        "rmkit/cli.py": "import typer\nfrom rmkit.errors import E\n",
        "rmkit/errors.py": "class E(Exception): ...\n",
        "rmkit/train/__init__.py": "",
        "rmkit/train/worker.py": "def main():\n    from rmkit.train import loop\n    import rmkit.loss as L\n",
        "rmkit/train/loop.py": "from rmkit.model import (\n    build,\n    load,\n)\n",
        "rmkit/model.py": "import torch\n",
        "rmkit/loss.py": "",
        "rmkit/demo.py": "from rmkit.train import loop\n",   # imports the study's code, but nothing imports it
        "rmkit/serve/__init__.py": "",
        "rmkit/serve/app.py": "from rmkit.model import build\n",
    }
    got = pr.import_closure(src, roots=("rmkit/cli.py", "rmkit/train/worker.py"))
    assert got == {"rmkit/__init__.py", "rmkit/cli.py", "rmkit/errors.py", "rmkit/train/__init__.py",
                   "rmkit/train/worker.py", "rmkit/train/loop.py", "rmkit/model.py", "rmkit/loss.py"}


def test_the_real_study_closure_holds_training_and_scoring_but_not_the_demo_or_server():
    files = pr.Git().study_files
    for f in ("rmkit/train/worker.py", "rmkit/train/loop.py", "rmkit/loss.py", "rmkit/evaluate.py",
              "rmkit/recipe.py", "rmkit/data/__init__.py"):
        assert f in files, f
    for f in ("rmkit/demo.py", "rmkit/commands/demo.py", "rmkit/serve/app.py"):
        assert f not in files, f


# ---- split counts --------------------------------------------------------------------------------------

def counts(dsp_prompts=119, helpful=444, harmless=447, webgpt=118):
    c = {f"dsp-{d}": {"records": dsp_prompts, "pairs": 4 * dsp_prompts, "prompts": dsp_prompts} for d in pr.DOMAINS}
    c["helpful"] = {"records": helpful, "pairs": helpful, "prompts": helpful}
    c["harmless"] = {"records": harmless, "pairs": harmless, "prompts": harmless}
    c["webgpt"] = {"records": webgpt, "pairs": webgpt, "prompts": webgpt}
    return c


def test_split_counts_pass():
    assert pr.split_problems(counts()) == []
    assert pr.split_problems(counts(dsp_prompts=100, helpful=400, harmless=400)) == []  # the floors themselves pass


def test_split_counts_too_few():
    got = pr.split_problems(counts(dsp_prompts=99, helpful=399, webgpt=0))
    assert len(got) == 4 + 1 + 1  # four DSP domains, helpful, webgpt
    assert "dsp-academy: 99 test queries, need >= 100" in got
    assert "helpful: 399 test pairs, need >= 400" in got
    assert "webgpt: no test pairs" in got


def test_split_counts_use_queries_not_pairs_for_dsp():
    c = counts()
    c["dsp-business"] = {"records": 99, "pairs": 480, "prompts": 99}  # 480 pairs, but only 99 queries
    assert pr.split_problems(c) == ["dsp-business: 99 test queries, need >= 100"]


def test_split_counts_missing_sets():
    c = counts()
    del c["harmless"], c["dsp-literature"]
    assert set(pr.split_problems(c)) == {"dsp-literature: no test side", "harmless: no test side"}


# ---- where the GRFT curve stops rising -----------------------------------------------------------------

def test_plateau():
    # se at the peak: sqrt(.6 * .4 / 100) = 0.049; 0.56 is within it, 0.50 is not
    pts = [(0, 0.50, 100), (100, 0.56, 100), (200, 0.60, 100), (300, 0.58, 100)]
    got = pr.plateau(pts)
    assert got["peak_x"] == 200 and got["stop_x"] == 100 and not got["still_rising"]
    rising = pr.plateau([(0, 0.50, 100), (100, 0.60, 100), (200, 0.70, 100)])
    assert rising["peak_x"] == 200 and rising["still_rising"]
    assert pr.plateau([]) is None


def test_wilson():
    lo, hi = pr.wilson(50, 100)
    assert round(lo, 4) == 0.4038 and round(hi, 4) == 0.5962


# ---- the bounds probes: one knob changed at a time against the run of that domain and size ----------------

def defined_study(tmp_path: Path, **over) -> "pr.Study":
    import argparse

    args = argparse.Namespace(scale="full", out=str(tmp_path / "out"), report=str(tmp_path / "r.md"), keep_stale=False)
    st = pr.Study(args, pr.dataclasses.replace(pr.PRESETS["full"], **over))
    st.counts = {f"train-dsp-{d}": {"records": 1400} for d in pr.DOMAINS}
    st.counts.update({f"train-{s}": {"records": 800} for s in ("helpful", "harmless")})
    st.define()
    return st


def test_bounds_probes_change_one_setting_of_the_efficiency_run(tmp_path):
    st = defined_study(tmp_path)
    ref, window, passes, low, high = st.bound_runs
    assert ref == "crft-business-n512-w0-e0" and st.runs[ref].part == "efficiency"  # shared, not retrained
    assert window == "crft-business-n512-w0-e0-ml128" and passes == "crft-business-n512-w0-e0-ep2"
    assert (low, high) == ("crft-business-n512-w0-e0-lr2e-05", "crft-business-n512-w0-e0-lr0.0001")
    r, w, e, lo, hi = (st.runs[n].recipe for n in st.bound_runs)
    assert [x["data"]["max_length"] for x in (r, w, e, lo, hi)] == [64, 128, 64, 64, 64]
    assert [x["train"]["epochs"] for x in (r, w, e, lo, hi)] == [1.0, 1.0, 2.0, 1.0, 1.0]
    assert [x["train"]["lr"] for x in (r, w, e, lo, hi)] == [5e-5, 5e-5, 5e-5, 2e-5, 1e-4]
    assert [st.runs[n].steps for n in st.bound_runs] == [32, 32, 64, 32, 32]
    strip = lambda rec: {**rec, "data": {**rec["data"], "max_length": 0},  # noqa: E731
                         "train": {**rec["train"], "epochs": 0, "lr": 0, "output_dir": ""}}
    assert strip(r) == strip(w) == strip(e) == strip(lo) == strip(hi)  # nothing else differs
    assert st.runs[window].label == "CRFT business n=512 128 tokens"
    assert st.runs[high].label == "CRFT business n=512 lr 0.0001"
    g = st.groups["bounds-business"]
    assert (g.part, g.runs, g.sets) == ("bounds", [ref, window, passes, low, high], ["dsp-business"])
    assert "crft-business-n512-w0-e0-ml128" not in st.eff_runs["business"]


def test_each_bounds_probe_is_named_by_the_one_knob_it_changes(tmp_path, monkeypatch):
    st = defined_study(tmp_path)
    diff = {"value": 0.01, "lo": -0.02, "hi": 0.04}
    monkeypatch.setattr(st, "result", lambda group, run, s: {"diff_vs_first": diff} if run != st.bound_runs[0] else {})
    knobs = [knob for _, knob, _ in pr.Report(st).bound_effects()]
    assert knobs == ["128- instead of 64-token rows", "2 passes instead of 1", "lr 2e-05 instead of 5e-05",
                     "lr 0.0001 instead of 5e-05"]


def test_no_bounds_probes_when_unset(tmp_path):
    st = defined_study(tmp_path, bounds_domain=None)
    assert st.bound_runs == [] and "bounds-business" not in st.groups


def test_the_cross_table_scores_every_model_at_the_crft_window(tmp_path):
    st = defined_study(tmp_path)
    cross, base = st.groups["cross"], st.groups["grft-vs-base"]
    assert cross.runs[0] == "grft" and cross.max_length == 64
    assert st.group_key(cross)["max_length"] == 64
    assert base.max_length is None and "max_length" not in st.group_key(base)  # its cache key is unchanged


def test_a_part_trains_the_runs_its_groups_share_with_a_later_part_first(tmp_path, monkeypatch):
    st = defined_study(tmp_path)
    calls = []
    monkeypatch.setattr(st, "ensure_run", lambda n: calls.append(("run", n)))
    monkeypatch.setattr(st, "ensure_group", lambda n: calls.append(("eval", n)))
    monkeypatch.setattr(st, "bows_for", lambda todo: None)
    monkeypatch.setattr(st, "write_report", lambda: None)
    st.run_part("efficiency")
    n128 = "crft-business-n128-w0-e0"
    assert st.runs[n128].part == "sweep"  # a sweep (0,0) cell, also efficiency's n=128 point
    first_eval = calls.index(("eval", "efficiency-business"))
    assert ("run", n128) in calls[:first_eval] and ("run", "crft-entertainment-n128-w0-e0") in calls[:first_eval]
    assert [c for c in calls if c[0] == "eval"] == [("eval", "efficiency-business"), ("eval", "efficiency-entertainment")]
    assert len(calls) == len(set(calls))  # each run once
