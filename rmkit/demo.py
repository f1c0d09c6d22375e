"""`rmkit demo`: the paper's three stages end to end on this machine, in minutes.

SmolLM2-135M (built in) on slices of the shared data: BLT on HH text, GRFT on HH pairs, CRFT on
DSP `business` with general-preference enrichment and imitation learning; each stage is a real
`deepspeed` launch from the CPU recipes, and each ends with an evaluation on the same general
(HH helpful test split) and business (DSP test split) pairs. Prints one table.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rmkit.console import console
from rmkit.errors import RmkitError
from rmkit.io import atomic_write_json, atomic_write_text
from rmkit.recipe import RECIPES_DIR, load_recipe

MARKER = ".rmkit-demo"


def _eval_sets(domain: str, limit: int) -> list[str]:
    data = "${RMKIT_DATA:-../shared/data}"
    return [
        "data.eval={}",
        f"data.eval.general={{path: '{data}/helpful.json', split: test, limit: {limit}}}",
        f"data.eval.{domain}={{path: '{data}/dsp.json', format: dsp, domain: {domain}, split: test, limit: {limit}}}",
    ]


def run_demo(out: Path, domain: str = "business", eval_limit: int = 32, extra: list[str] | None = None) -> list[dict]:
    from rmkit.train.launch import train

    if out.exists():
        if not (out / MARKER).exists():
            raise RmkitError(f"{out} exists and was not made by `rmkit demo`", hint="pass --out to a new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    atomic_write_text(out / MARKER, "made by rmkit demo; deleted by the next `rmkit demo`\n")
    rows = []
    parent = None
    for stage in ("blt", "grft", "crft"):
        sets = _eval_sets(domain, eval_limit)
        # the demo keeps only final/ (mid-run checkpoints cost ~10 s each here) and a short budget
        budget = {"blt": 6, "grft": 12, "crft": 10}[stage]
        overrides = [f"train.output_dir={out / stage}", "train.save_every=0", f"train.max_steps={budget}",
                     *sets, *(extra or [])]
        if parent is not None:
            overrides.append(f"model.path={parent}")
        recipe = load_recipe(RECIPES_DIR / "cpu" / f"{stage}.yaml", overrides, stage=stage,
                             domain=domain if stage == "crft" else None)
        console.rule(f"[bold]{stage}[/]: {recipe.model.path} -> {out / stage}")
        t0 = time.perf_counter()
        code = train(recipe)
        if code:
            raise RmkitError(f"the {stage} stage failed (exit code {code})", hint=f"see the output above; logs in {out / stage}")
        seconds = time.perf_counter() - t0
        run = out / stage
        evals = json.loads((run / "eval_final.json").read_text())
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        steps = [m for m in metrics if "loss_ranking" in m]
        tok_s = sum(m["tokens"] for m in steps) / max(1e-9, sum(m["seconds"] for m in steps))
        rows.append({"stage": stage, "seconds": seconds, "tokens_per_s": tok_s, "eval": evals,
                     # per-step losses are noisy at 8 records a step: average the first and last 3
                     "first_loss": sum(m["loss"] for m in steps[:3]) / len(steps[:3]),
                     "last_loss": sum(m["loss"] for m in steps[-3:]) / len(steps[-3:])})
        parent = run / "final"
    atomic_write_json(out / "demo.json", rows)
    _table(rows, domain)
    return rows


def _table(rows: list[dict], domain: str) -> None:
    from rich.table import Table

    # fits 80 columns, the width rich assumes when the output is a log file
    t = Table(title=f"rmkit demo, SmolLM2-135M: accuracy on general = HH helpful test, {domain} = DSP {domain} test")
    for col in ("stage", "general", domain, "length baseline", "loss", "tok/s", "wall s"):
        t.add_column(col, justify="right" if col != "stage" else "left", no_wrap=True)
    for r in rows:
        g, d = r["eval"]["general"], r["eval"][domain]
        t.add_row(r["stage"].upper(), f"{g['accuracy']:.3f}", f"{d['accuracy']:.3f}",
                  f"{g['length_baseline']:.3f}/{d['length_baseline']:.3f}",
                  f"{r['first_loss']:.2f}->{r['last_loss']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['seconds']:.0f}")
    console.print(t)
    console.print("loss: mean of the first three -> last three steps (ranking + weighted imitation; LM loss for BLT). "
                  "BLT trains the language model only, so its row scores with an untrained reward head "
                  f"(chance level). length baseline: general/{domain}. Accuracies are over "
                  f"{rows[0]['eval']['general']['pairs']} general and "
                  f"{rows[0]['eval'][domain]['pairs']} {domain} pairs.")
