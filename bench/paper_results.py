"""Check the paper's claims with rmkit on real data; write docs/results.md.

Every number in the report comes from an rmkit command that this script runs and prints next to
the number. CPU-sized by default (SmolLM2-135M, slices of ../shared/data); `--grft-steps`,
`--crft-steps` and `--eval-limit` set the budgets (raise them on a larger machine).

    python bench/paper_results.py                  # ~80 min on a 2-core CPU
    python bench/paper_results.py --only grft      # one part (grft, domains, strategies, efficiency)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

DOMAINS = ("academy", "business", "entertainment", "literature")
DATA = "${RMKIT_DATA:-../shared/data}"


def sh(cmd: list[str], skip: bool = False) -> None:
    """Run one rmkit command, unless its output already exists."""
    line = shlex.join(cmd)
    if skip:
        print(f"\n(done already) $ {line}", flush=True)
        return
    print(f"\n$ {line}", flush=True)
    t0 = time.time()
    code = subprocess.call(cmd)
    print(f"[{time.time() - t0:.0f} s, exit {code}]", flush=True)
    if code:
        raise SystemExit(f"command failed ({code}): {line}")


def evals(run: Path) -> dict:
    return json.loads((run / "eval_final.json").read_text())


def start_eval(run: Path) -> dict:
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == 0 and "eval" in row:
            return row["eval"]
    raise SystemExit(f"{run} has no step-0 eval (train.eval_on_start)")


def acc(e: dict) -> str:
    return f"{e['accuracy']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--grft-steps", type=int, default=48, help="GRFT steps of 8 HH pairs (one pass)")
    ap.add_argument("--crft-steps", type=int, default=16, help="CRFT steps of 8 domain pairs (one pass)")
    ap.add_argument("--grft-lr", type=float, default=2e-5)
    ap.add_argument("--crft-lr", type=float, default=2e-5)
    ap.add_argument("--eval-limit", type=int, default=96, help="test records per eval set")
    ap.add_argument("--only", choices=["grft", "domains", "strategies", "efficiency"], default=None)
    ap.add_argument("--strategy-domains", default="business,entertainment",
                    help="domains whose CRFT gets the imitation x enrichment grid (claim 4)")
    ap.add_argument("--report", default="docs/results.md")
    args = ap.parse_args()
    out = Path(args.out)
    grft_steps, crft_steps, ev = args.grft_steps, args.crft_steps, args.eval_limit
    lrs = {"grft": args.grft_lr, "crft": args.crft_lr}
    rm = [sys.executable, "-m", "rmkit"]
    log: dict[str, list[str]] = {k: [] for k in ("grft", "domains", "strategies", "efficiency")}
    grft = out / "grft"
    general_eval = f"data.eval.general={{path: '{DATA}/helpful.json', split: test, limit: {ev}}}"

    # every command of every part, so the report shows them all whichever part this call runs
    plan: list[tuple[str, list[str], bool]] = []  # (part, argv, done already)
    plan.append(("grft", [*rm, "train", "grft", "--recipe", "recipes/cpu/grft.yaml", "--set", f"train.output_dir={grft}",
                          "--set", f"train.max_steps={grft_steps}", "--set", f"data.train.0.limit={grft_steps * 8}",
                          "--set", f"train.lr={lrs['grft']:g}",
                          "--set", "data.eval={}", "--set", general_eval, "--set", "train.eval_on_start=true",
                          "--set", "train.save_every=0"], (grft / "final" / "meta.json").exists()))

    def sweep(domain: str, weights: str, enrich: str, part: str) -> None:
        plan.append((part, [*rm, "sweep", "imitation", "--recipe", "recipes/cpu/crft.yaml", "--domain", domain,
                            "--weights", weights, "--enrich", enrich, "--from", str(grft / "final"),
                            "-o", str(out / f"crft-{domain}"),
                            "--set", f"train.max_steps={crft_steps}", "--set", f"train.lr={lrs['crft']:g}",
                            "--set", "data.eval={}",
                            "--set", f"data.eval.domain={{path: '{DATA}/dsp.json', format: dsp, split: test, limit: {ev}}}",
                            "--set", general_eval, "--set", "train.save_every=0"], False))  # a sweep resumes itself

    strategic = [d for d in DOMAINS if d in args.strategy_domains.split(",")]
    for d in DOMAINS:
        if d not in strategic:
            sweep(d, "0", "0", "domains")
    for d in strategic:
        sweep(d, "0,1", "0,0.5", "strategies")
    for k in (max(1, crft_steps // 4), max(1, crft_steps // 2)):
        run = out / f"efficiency-{k * 8}"
        plan.append(("efficiency", [
            *rm, "train", "crft", "--domain", "business", "--recipe", "recipes/cpu/crft.yaml",
            "--set", f"model.path={grft / 'final'}", "--set", f"train.output_dir={run}",
            "--set", f"data.train=[{{path: '{DATA}/dsp.json', format: dsp, split: train, limit: {k * 8}}}]",
            "--set", "data.mix_size=null", "--set", "loss.imitation_weight=0", "--set", f"train.max_steps={k}",
            "--set", f"train.lr={lrs['crft']:g}", "--set", "data.eval={}", "--set",
            f"data.eval.domain={{path: '{DATA}/dsp.json', format: dsp, split: test, limit: {ev}}}",
            "--set", general_eval, "--set", "train.save_every=0"], (run / "final" / "meta.json").exists()))

    runs = {"grft": ("grft",), "domains": ("domains", "strategies"), "strategies": ("strategies",),
            "efficiency": ("efficiency",), None: ("grft", "domains", "strategies", "efficiency")}[args.only]
    for part, cmd, _ in plan:
        log[part].append(shlex.join(cmd).replace(shlex.join(rm), "rmkit", 1))  # as a user types it
    report = lambda: write_report(out, Path(args.report), log, grft_steps, crft_steps, ev, lrs, strategic)  # noqa: E731
    for part, cmd, done in plan:
        if part in runs:
            sh(cmd, skip=done)
            report()
    report()


def write_report(out: Path, report: Path, log: dict, grft_steps: int, crft_steps: int, ev: int,
                 lrs: dict[str, float], strategic: list[str]) -> None:
    cpu = "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os

    lines = [f"<!-- written by bench/paper_results.py on {time.strftime('%Y-%m-%d')} -->"]
    lines.append(f"Hardware: {cpu}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}. "
                 f"Model: SmolLM2-135M-Instruct (built-in `smollm2-135m`), fp32, max length 128. "
                 f"GRFT: {grft_steps} steps x 8 HH-helpful train pairs (one pass), lr {lrs['grft']:g} cosine; "
                 f"CRFT: {crft_steps} steps x 8 domain pairs (one pass), lr {lrs['crft']:g} constant; "
                 f"eval: up to {ev} test records per set (prompt-hash split, 10% test).")
    grft = out / "grft"
    if (grft / "eval_final.json").exists():
        b, g = start_eval(grft)["general"], evals(grft)["general"]
        lines += ["", "### 1. GRFT raises general accuracy over the untrained base", "",
                  "| model | HH helpful test acc | pairs | length baseline |", "|---|---|---|---|",
                  f"| base (SmolLM2 + untrained head) | {acc(b)} | {b['pairs']} | {b['length_baseline']:.3f} |",
                  f"| GRFT | {acc(g)} | {g['pairs']} | {g['length_baseline']:.3f} |", "", "```", *log["grft"], "```"]
    rows = []
    for d in DOMAINS:
        sw = out / f"crft-{d}" / "sweep.json"
        if not sw.exists():
            continue
        s = json.loads(sw.read_text())
        p = next(x for x in s["points"] if x["imitation_weight"] == 0 and x["enrich"] == 0)
        st = s["grft_start"]
        de = p["eval"]["domain"]
        ge = p["eval"]["general"]
        rows.append(f"| {d} | {st['domain_acc']:.3f} | {p['domain_acc']:.3f} | {de['length_baseline']:.3f} | "
                    f"{st['general_acc']:.3f} | {p['general_acc']:.3f} | {ge['length_baseline']:.3f} | "
                    f"{de['pairs']} / {ge['pairs']} |")
    if rows:
        lines += ["", "### 2-3. CRFT per domain: domain accuracy vs GRFT, and what it does to general accuracy", "",
                  "| domain | domain acc, GRFT | domain acc, CRFT | domain length baseline | general acc, GRFT | "
                  "general acc, CRFT | general length baseline | eval pairs (domain / general) |",
                  "|---|---|---|---|---|---|---|---|", *rows, "", "```", *log["domains"], *log["strategies"], "```"]
    lines += ["", "### 4. Imitation learning and general enrichment during CRFT"]
    for dom in strategic:
        sw = out / f"crft-{dom}" / "sweep.json"
        if not sw.exists():
            continue
        s = json.loads(sw.read_text())
        st = s["grft_start"]
        lines += ["", f"**{dom}**", "",
                  f"| imitation weight | enrichment | train pairs (domain + general) | {dom} acc | {dom} change "
                  f"vs GRFT | general acc | general change vs GRFT | length baselines ({dom} / general) |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| GRFT start | - | - | {st['domain_acc']:.3f} | - | {st['general_acc']:.3f} | - | - |"]
        for p in s["points"]:
            if "general_acc" in p:
                n_dom = crft_steps * 8
                n_all = math.ceil(n_dom / (1 - p["enrich"]) / 8) * 8
                lines.append(f"| {p['imitation_weight']:g} | {p['enrich']:g} | {n_dom} + {n_all - n_dom} | "
                             f"{p['domain_acc']:.3f} | {p['domain_acc'] - st['domain_acc']:+.3f} | "
                             f"{p['general_acc']:.3f} | {p['general_acc'] - st['general_acc']:+.3f} | "
                             f"{p['eval']['domain']['length_baseline']:.3f} / {p['eval']['general']['length_baseline']:.3f} |")
        png = out / f"crft-{dom}" / "tradeoff.png"
        if png.exists():  # runs/ is not committed: keep a copy beside the report
            img = report.parent / "img" / f"tradeoff-{dom}.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            img.write_bytes(png.read_bytes())
            lines += ["", f"![{dom} trade-off](img/tradeoff-{dom}.png)"]
        lines += ["", "```", *[c for c in log["strategies"] if f"--domain {dom} " in c], "```"]
    sw = out / "crft-business" / "sweep.json"
    eff = []
    for k in (8 * max(1, crft_steps // 4), 8 * max(1, crft_steps // 2)):
        run = out / f"efficiency-{k}"
        if (run / "eval_final.json").exists():
            e = evals(run)["domain"]
            eff.append(f"| {k} | {acc(e)} | {e['length_baseline']:.3f} |")
    if sw.exists():
        s = json.loads(sw.read_text())
        p = next(x for x in s["points"] if x["imitation_weight"] == 0 and x["enrich"] == 0)
        eff.insert(0, f"| 0 (GRFT) | {s['grft_start']['domain_acc']:.3f} | {p['eval']['domain']['length_baseline']:.3f} |")
        eff.append(f"| {crft_steps * 8} (the business sweep's λ=0, e=0 point) | {p['domain_acc']:.3f} | {p['eval']['domain']['length_baseline']:.3f} |")
    if eff:
        lines += ["", "### 5. Data efficiency: business accuracy against CRFT pairs", "",
                  "| CRFT pairs | business acc | length baseline |", "|---|---|---|", *eff, "", "```", *log["efficiency"], "```"]
    report.parent.mkdir(parents=True, exist_ok=True)
    # the tables go between the markers; the hand-written text around them stays
    old = report.read_text() if report.exists() else "# Results\n\n<!-- results -->\n<!-- /results -->\n"
    head, _, rest = old.partition("<!-- results -->")
    tail = rest.partition("<!-- /results -->")[2]
    report.write_text(head.rstrip() + "\n\n<!-- results -->\n" + "\n".join(lines) + "\n<!-- /results -->\n"
                      + tail.lstrip("\n"))
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
