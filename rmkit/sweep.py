"""`rmkit sweep imitation`: the paper's central trade-off, one real CRFT launch per grid point.

Grid: imitation-loss weight x general-enrichment share. Each point continues the same GRFT
checkpoint on the domain's pairs (plus general pairs for enrichment > 0), is evaluated on the
domain's test pairs and the general test sets, and lands in DIR/sweep.json, DIR/sweep.csv, a rich
table and DIR/tradeoff.png (general vs domain accuracy, Pareto front, GRFT start marked).
Finished points are not rerun; a failed point is reported and the sweep goes on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rmkit.checkpoint import META_FILE
from rmkit.console import console
from rmkit.errors import RmkitError
from rmkit.io import atomic_file, atomic_write_json, atomic_write_text, sha256_text
from rmkit.recipe import Recipe, dump_recipe, load_recipe, load_tree

LEDGER = "points.json"  # point name -> sha256 of the resolved recipe it was trained with

DEFAULT_GENERAL = "${RMKIT_DATA:-../shared/data}/helpful.json"


@dataclass(frozen=True)
class Point:
    imitation: float
    enrich: float

    @property
    def name(self) -> str:
        return f"imit{self.imitation:g}-enrich{self.enrich:g}"


def parse_grid(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise RmkitError(f"--{what} must be comma-separated numbers, got {text!r}", hint=f"e.g. --{what} 0,0.5,1") from None
    if not vals or any(v < 0 or math.isnan(v) for v in vals):
        raise RmkitError(f"--{what} needs one or more numbers >= 0, got {text!r}")
    if what == "enrich" and any(v >= 1 for v in vals):
        raise RmkitError(f"--enrich values are the share of general pairs and must be below 1, got {text!r}")
    return vals


def point_overrides(base: dict[str, Any], p: Point, out: Path, parent: str | None, general: str,
                    domain_pairs: int | None = None, global_batch: int = 1) -> list[str]:
    """The --set list that turns the base CRFT recipe into grid point `p`.

    Enrichment adds general pairs on top of a fixed domain budget, as in the paper: every point
    sees the same `domain_pairs` domain records; a point with enrichment e trains on
    domain_pairs / (1 - e) records in all (and proportionally more steps).
    """
    train = base["data"]["train"]
    domain_src = dict(train[0])
    domain_src.pop("weight", None)
    if domain_pairs is not None:
        domain_src["limit"] = domain_pairs
    sources = [domain_src]
    sets: list[str] = []
    if p.enrich > 0:
        gen = dict(train[1]) if len(train) > 1 else {"path": general, "split": "train"}
        gen.pop("weight", None)
        domain_src["weight"] = round(1 - p.enrich, 6)
        gen["weight"] = round(p.enrich, 6)
        sources.append(gen)
        if domain_pairs is not None:
            total = math.ceil(domain_pairs / (1 - p.enrich) / global_batch) * global_batch
            sets += [f"data.mix_size={total}", f"train.max_steps={total // global_batch}"]
    else:
        sets.append("data.mix_size=null")
        if domain_pairs is not None:
            sets.append(f"train.max_steps={max(1, domain_pairs // global_batch)}")
    sets += [f"data.train={json.dumps(sources)}", f"loss.imitation_weight={p.imitation}",
             f"train.output_dir={out / 'points' / p.name}"]
    if parent:
        sets.append(f"model.path={parent}")
    return sets


def _accuracies(evals: dict[str, Any], domain_set: str) -> tuple[float, float]:
    dom = evals[domain_set]["accuracy"]
    general = [v for k, v in evals.items() if k != domain_set]
    pairs = sum(v["pairs"] for v in general)
    gen = sum(v["accuracy"] * v["pairs"] for v in general) / pairs if pairs else float("nan")
    return gen, dom


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (ties kept), sorted by x."""
    keep = [i for i, (x, y) in enumerate(points)
            if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(keep, key=lambda i: points[i][0])


def run_sweep(recipe_path: str, domain: str, weights: list[float], enrich: list[float], out: Path,
              parent: str | None = None, general: str = DEFAULT_GENERAL, extra: list[str] | None = None,
              train_fn: Callable[[Recipe], int] | None = None,
              eval_fn: Callable[[Path, Recipe], dict[str, Any]] | None = None) -> dict[str, Any]:
    from rmkit.train.launch import train as default_train

    train_fn = train_fn or default_train
    base_tree = load_tree(recipe_path)
    if extra:
        from rmkit.recipe import apply_overrides, parse_set

        base_tree = apply_overrides(base_tree, parse_set(extra))
    if base_tree.get("stage") != "crft":
        raise RmkitError(f"a sweep runs CRFT points, but {recipe_path} is a '{base_tree.get('stage')}' recipe",
                         hint="use recipes/cpu/crft.yaml or recipes/crft.yaml")
    base = load_recipe(recipe_path, [*(extra or []), *([f"model.path={parent}"] if parent else [])], stage="crft", domain=domain)
    domain_set = "domain" if "domain" in base.data.eval else next(
        (k for k, s in base.data.eval.items() if s.format == "dsp" or Path(s.path).name.startswith("dsp")), None)
    if domain_set is None or len(base.data.eval) < 2:
        raise RmkitError("the sweep recipe needs a domain eval set (a dsp source) and at least one general eval set",
                         where=recipe_path, hint="see recipes/cpu/crft.yaml's data.eval")
    out.mkdir(parents=True, exist_ok=True)
    grid = [Point(w, e) for e in enrich for w in weights]
    # the domain budget every point shares: what the plain recipe would train on
    domain_pairs = base.train.max_steps * base.train.global_batch if base.train.max_steps else base.data.train[0].limit
    results: list[dict[str, Any]] = []
    start = _grft_start(base, out, domain_set, eval_fn)
    ledger: dict[str, str] = json.loads((out / LEDGER).read_text()) if (out / LEDGER).exists() else {}
    for i, p in enumerate(grid, 1):
        run = out / "points" / p.name
        row: dict[str, Any] = {"point": p.name, "imitation_weight": p.imitation, "enrich": p.enrich, "run": str(run)}
        done = run / "eval_final.json"
        try:
            sets = point_overrides(base_tree, p, out, parent, general, domain_pairs, base.train.global_batch)
            r = load_recipe(recipe_path, [*(extra or []), *sets], stage="crft", domain=domain)
        except RmkitError as e:
            row["status"] = f"failed: {e.problem}"
            console.print(f"[red]point {p.name} failed[/]: {row['status']}; continuing")
            results.append(row)
            continue
        key = sha256_text(dump_recipe(r))
        if done.exists() and (run / "final" / META_FILE).exists():
            if ledger.get(p.name, key) != key:  # same folder, other settings: never pass old numbers off as new
                row["status"] = (f"stale: {run} was trained with another recipe; delete it or sweep into another -o")
                console.print(f"[red]point {p.name}[/]: {row['status']}")
                results.append(row)
                continue
            row["status"] = "cached"
        else:
            console.rule(f"[bold]sweep point {i}/{len(grid)}[/]: {p.name}")
            ledger[p.name] = key
            atomic_write_json(out / LEDGER, ledger)
            t0 = time.perf_counter()
            try:
                code = train_fn(r) if not (run / "run.json").exists() else _resume(train_fn, r)
                row["status"] = "ok" if code == 0 and done.exists() else f"failed (exit {code})"
            except RmkitError as e:
                row["status"] = f"failed: {e.problem}"
            row["seconds"] = round(time.perf_counter() - t0, 1)
        if done.exists():
            evals = json.loads(done.read_text())
            row["general_acc"], row["domain_acc"] = _accuracies(evals, domain_set)
            row["eval"] = evals
        else:
            console.print(f"[red]point {p.name} failed[/]: {row['status']}; continuing")
        results.append(row)
    summary = {"domain": domain, "recipe": recipe_path, "parent": parent or base.model.path, "domain_set": domain_set,
               "grft_start": start, "points": results}
    _write_outputs(summary, out)
    return summary


def _resume(train_fn: Callable[..., int], r: Recipe) -> int:
    try:
        return train_fn(r, resume=True)
    except TypeError:
        return train_fn(r)


def _grft_start(base: Recipe, out: Path, domain_set: str,
                eval_fn: Callable[[Path, Recipe], dict[str, Any]] | None) -> dict[str, Any] | None:
    """Accuracy of the GRFT checkpoint itself on the same eval sets (cached in DIR/grft_start.json)."""
    cache = out / "grft_start.json"
    key = sha256_text(json.dumps([str(base.model.path), base.data.max_length, base.data.truncation_side,
                                  {k: v.model_dump(mode="json") for k, v in base.data.eval.items()}]))
    if cache.exists():
        start = json.loads(cache.read_text())
        if start.get("key") == key:
            return start
    evals = (eval_fn or evaluate_on_recipe_sets)(Path(base.model.path), base)
    gen, dom = _accuracies(evals, domain_set)
    start = {"general_acc": gen, "domain_acc": dom, "eval": evals, "key": key}
    atomic_write_json(cache, start)
    return start


def evaluate_on_recipe_sets(path: Path, recipe: Recipe) -> dict[str, Any]:
    """Score a checkpoint on the recipe's eval sets, resolved as training resolves them."""
    from rmkit.data.sources import load_eval_sets
    from rmkit.evaluate import score_records, set_result
    from rmkit.inspection import inspect_checkpoint
    from rmkit.scorer import default_device, load_scorer

    ckpt = inspect_checkpoint(path, recipe.data.max_length)
    device, dtype = default_device()
    scorer = load_scorer(ckpt, device, dtype)
    out = {}
    for name, (records, _) in load_eval_sets(recipe).items():
        encoded, rewards = score_records(scorer, records)
        out[name] = set_result(records, encoded, rewards).summary()
    return out


def _write_outputs(summary: dict[str, Any], out: Path) -> None:
    atomic_write_json(out / "sweep.json", summary)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["point", "imitation_weight", "enrich", "general_acc", "domain_acc", "status", "seconds"])
    for r in summary["points"]:
        w.writerow([r["point"], r["imitation_weight"], r["enrich"], r.get("general_acc", ""), r.get("domain_acc", ""),
                    r["status"], r.get("seconds", "")])
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    _table(summary)
    _plot(summary, out / "tradeoff.png")


def _table(summary: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"CRFT sweep, domain {summary['domain']}")
    for c in ("point", "imitation", "enrich", "general acc", "domain acc", "status"):
        t.add_column(c)
    s = summary.get("grft_start")
    if s:
        t.add_row("GRFT start", "-", "-", f"{s['general_acc']:.3f}", f"{s['domain_acc']:.3f}", "")
    for r in summary["points"]:
        t.add_row(r["point"], f"{r['imitation_weight']:g}", f"{r['enrich']:g}",
                  f"{r['general_acc']:.3f}" if "general_acc" in r else "-",
                  f"{r['domain_acc']:.3f}" if "domain_acc" in r else "-", r["status"])
    console.print(t)


def _label_offsets(xy: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Label offsets (points) so that labels of nearby points do not print over each other: each
    label takes the first of four corners whose box (about 0.15 x 0.04 of the axes, in data
    range units) is clear of the labels already placed."""
    if not xy:
        return []
    xs, ys = [x for x, _ in xy], [y for _, y in xy]
    wx, wy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    corners = [((4, 4), (0.0, 0.0)), ((4, -12), (0.0, -0.08)), ((-62, 4), (-0.17, 0.0)), ((-62, -12), (-0.17, -0.08))]
    placed: list[tuple[float, float]] = []
    out = []
    for x, y in xy:
        nx, ny = (x - min(xs)) / wx, (y - min(ys)) / wy
        for off, (dx, dy) in corners:  # noqa: B007 (the last tried corner is kept below)
            bx, by = nx + dx, ny + dy
            if all(abs(bx - px) > 0.17 or abs(by - py) > 0.06 for px, py in placed):
                break
        placed.append((bx, by))
        out.append(off)
    return out


def _plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]matplotlib is not installed: no tradeoff.png (pip install 'rmkit[plots]')[/]")
        return
    pts = [r for r in summary["points"] if "general_acc" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    xy = [(r["domain_acc"], r["general_acc"]) for r in pts]
    if xy:
        ax.scatter([x for x, _ in xy], [y for _, y in xy], color="tab:blue", zorder=3, label="CRFT runs")
        for r, (x, y), off in zip(pts, xy, _label_offsets(xy)):
            ax.annotate(f"λ={r['imitation_weight']:g}, e={r['enrich']:g}", (x, y), textcoords="offset points",
                        xytext=off, fontsize=8)
        front = pareto(xy)
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="tab:orange", lw=1.5,
                label="Pareto front", zorder=2)
    s = summary.get("grft_start")
    if s:
        ax.scatter([s["domain_acc"]], [s["general_acc"]], marker="*", s=180, color="tab:red", zorder=4, label="GRFT start")
    ax.set_xlabel(f"{summary['domain']} accuracy (DSP test pairs)")
    ax.set_ylabel("general accuracy (HH test pairs)")
    ax.set_title(f"Customization vs general preference, domain {summary['domain']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", bbox_inches="tight")
    plt.close(fig)
