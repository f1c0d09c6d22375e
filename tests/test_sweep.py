"""Sweep orchestration: grid -> recipes, resume of finished points, failures reported, outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rmkit.errors import RmkitError
from rmkit.io import atomic_write_json
from rmkit.recipe import Recipe
from rmkit.sweep import Point, pareto, parse_grid, point_overrides, run_sweep

RECIPE = """
stage: crft
domain: business
model: {path: /nonexistent/grft}
data:
  train: [{path: dsp.json, format: dsp, split: train}]
  eval:
    domain: {path: dsp.json, format: dsp, split: test}
    general: {path: helpful.json, split: test}
train: {lr: 1.0e-6, global_batch: 8, output_dir: "x"}
"""


def test_pareto_front() -> None:
    pts = [(0.5, 0.5), (0.7, 0.4), (0.6, 0.6), (0.4, 0.7), (0.6, 0.6), (0.3, 0.3)]
    assert pareto(pts) == [3, 2, 4, 1]  # (0.5,0.5) and (0.3,0.3) are dominated; equal points both kept


def test_parse_grid() -> None:
    assert parse_grid("0,0.1, 1", "weights") == [0.0, 0.1, 1.0]
    with pytest.raises(RmkitError, match="--enrich values are the share of general pairs and must be below 1"):
        parse_grid("0,1", "enrich")
    with pytest.raises(RmkitError, match="comma-separated numbers"):
        parse_grid("a,b", "weights")


def test_point_overrides_build_the_mix(tmp_path: Path) -> None:
    base = {"data": {"train": [{"path": "dsp.json", "format": "dsp", "split": "train", "weight": 0.5},
                               {"path": "h.json", "split": "train", "weight": 0.5}]}}
    sets = dict(s.split("=", 1) for s in point_overrides(base, Point(0.5, 0.25), tmp_path, "g/final", "gen.json",
                                                        domain_pairs=96, global_batch=8))
    # the domain budget stays 96 pairs; 25% enrichment adds 32 general pairs: 128 records, 16 steps
    assert json.loads(sets["data.train"]) == [
        {"path": "dsp.json", "format": "dsp", "split": "train", "limit": 96, "weight": 0.75},
        {"path": "h.json", "split": "train", "weight": 0.25}]
    assert (sets["data.mix_size"], sets["train.max_steps"]) == ("128", "16")
    assert sets["loss.imitation_weight"] == "0.5" and sets["model.path"] == "g/final"
    solo = dict(s.split("=", 1) for s in point_overrides(base, Point(1.0, 0.0), tmp_path, None, "gen.json",
                                                        domain_pairs=96, global_batch=8))
    assert json.loads(solo["data.train"]) == [{"path": "dsp.json", "format": "dsp", "split": "train", "limit": 96}]
    assert (solo["data.mix_size"], solo["train.max_steps"]) == ("null", "12")


def test_sweep_runs_resumes_and_survives_a_failed_point(tmp_path: Path) -> None:
    recipe = tmp_path / "crft.yaml"
    recipe.write_text(RECIPE)
    calls: list[tuple[float, list[str]]] = []

    def fake_train(r: Recipe, resume: bool = False) -> int:
        w = r.loss.imitation_weight
        calls.append((w, [s.path for s in r.data.train]))
        if w == 1.0:
            return 1  # this point fails
        run = Path(r.train.output_dir)
        (run / "final").mkdir(parents=True)
        (run / "final" / "meta.json").write_text("{}")
        atomic_write_json(run / "eval_final.json", {
            "domain": {"accuracy": 0.6 + w / 10, "pairs": 10},
            "general": {"accuracy": 0.7 - w / 10, "pairs": 10}})
        return 0

    evals: list[int] = []

    def fake_eval(path: Path, r: Recipe) -> dict:
        evals.append(r.data.max_length)
        return {"domain": {"accuracy": 0.5, "pairs": 10}, "general": {"accuracy": 0.72, "pairs": 10}}

    out = tmp_path / "sweep"
    s = run_sweep(str(recipe), "business", [0.0, 0.5, 1.0], [0.0, 0.5], out, general="h.json",
                  train_fn=fake_train, eval_fn=fake_eval)
    assert len(calls) == 6
    assert calls[3] == (0.0, ["dsp.json", "h.json"])  # enrich 0.5 adds the general source
    status = {p["point"]: p["status"] for p in s["points"]}
    assert status["imit1-enrich0"] == "failed (exit 1)" and status["imit0.5-enrich0"] == "ok"
    assert s["grft_start"]["general_acc"] == 0.72
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["point"] for r in rows][:3] == ["imit0-enrich0", "imit0.5-enrich0", "imit1-enrich0"]
    assert float(rows[1]["domain_acc"]) == pytest.approx(0.65)
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # second run: finished points are cached, only the failed ones are retried
    calls.clear()
    s2 = run_sweep(str(recipe), "business", [0.0, 0.5, 1.0], [0.0, 0.5], out, general="h.json",
                   train_fn=fake_train, eval_fn=fake_eval)
    assert [w for w, _ in calls] == [1.0, 1.0]
    assert sum(p["status"] == "cached" for p in s2["points"]) == 4
    # third run into the same folder with another setting: the old points are not passed off as new
    calls.clear()
    s3 = run_sweep(str(recipe), "business", [0.0], [0.0], out, general="h.json", extra=["train.lr=2e-6"],
                   train_fn=fake_train, eval_fn=fake_eval)
    assert calls == []
    assert s3["points"][0]["status"] == (f"stale: {out / 'points' / 'imit0-enrich0'} was trained with another "
                                         "recipe; delete it or sweep into another -o")
    assert "domain_acc" not in s3["points"][0]
    # the GRFT start is evaluated once, and again only when its eval settings change
    assert evals == [512]
    run_sweep(str(recipe), "business", [0.0], [0.0], out, general="h.json", extra=["data.max_length=256"],
              train_fn=fake_train, eval_fn=fake_eval)
    assert evals == [512, 256]


def test_sweep_needs_a_crft_recipe(tmp_path: Path) -> None:
    r = tmp_path / "g.yaml"
    r.write_text(RECIPE.replace("stage: crft", "stage: grft"))
    with pytest.raises(RmkitError, match="a sweep runs CRFT points, but .* is a 'grft' recipe"):
        run_sweep(str(r), "business", [0.0], [0.0], tmp_path / "o", train_fn=lambda r: 0)


def test_labels_of_nearby_points_take_different_corners() -> None:
    from rmkit.sweep import _label_offsets

    # two points 0.01 apart on a 0.08-wide plot, one far away: the near pair must not share a corner
    offs = _label_offsets([(0.62, 0.63), (0.646, 0.604), (0.656, 0.604), (0.70, 0.59)])
    assert offs[1] != offs[2]
    assert offs[0] == offs[1] == offs[3] == (4, 4)
