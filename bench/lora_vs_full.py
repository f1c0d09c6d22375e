"""LoRA vs full CRFT: tokens/s and peak memory for the same few optimizer steps.

Each mode runs in a fresh child process (so peak RSS is its own) that builds the real training
Trainer (DeepSpeed engine, one process, the recipe's ZeRO stage) on the CRFT recipe and times
`train_step`; the first step is warm-up and not timed. Peak memory: the process's max RSS
(`resource.getrusage`, includes loading the model) and, on a GPU, `torch.cuda.max_memory_allocated`.

  python bench/lora_vs_full.py --parent /tmp/lora-grft/final [--steps 2] [--r 8] \\
      [--recipe recipes/cpu/crft.yaml] [--domain business]

`--parent` is a GRFT checkpoint (make one with
`rmkit train grft --recipe recipes/cpu/grft.yaml --set train.max_steps=2 --set train.output_dir=/tmp/lora-grft`).
Timings on a shared machine are noisy: say so when you report them. On a busy 2-core CPU each
mode takes minutes (model load, data, warm-up step, timed steps); on a GPU, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """One mode: build the Trainer in this process (DeepSpeed's engine, a world of one) and time `steps` optimizer steps."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from rmkit.recipe import load_recipe
    from rmkit.train.loop import Trainer
    from rmkit.train.rundir import plan_run, write_run_dir

    sets = [f"model.path={args.parent}", f"train.max_steps={args.steps + 1}", "launch.gpus=1",
            f"train.output_dir={args.out}", "train.save_every=0", "train.eval_every=0"]
    if args.mode == "lora":
        sets.append(f"model.lora.r={args.r}")
    recipe = load_recipe(args.recipe, sets, stage="crft", domain=args.domain)
    recipe.data.eval = {}
    write_run_dir(recipe, plan_run(recipe))
    runner = Trainer(Path(args.out))
    runner.engine.train()
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in runner.model.parameters() if p.requires_grad)
    runner.train_step(0)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    tokens, started = 0, time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens += runner.train_step(step)["tokens"]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    out = {"mode": args.mode, "trainable": trainable, "tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parent", required=True, help="GRFT checkpoint folder (full, not an adapter)")
    ap.add_argument("--recipe", default="recipes/cpu/crft.yaml")
    ap.add_argument("--domain", default="business")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps (after one warm-up step)")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        child(args)
        return

    from rich.console import Console
    from rich.table import Table

    results = {}
    with tempfile.TemporaryDirectory(prefix="rmkit-lora-bench-") as tmp:
        for mode in ("full", "lora"):
            cmd = [sys.executable, __file__, "--parent", args.parent, "--recipe", args.recipe, "--domain", args.domain,
                   "--steps", str(args.steps), "--r", str(args.r), "--mode", mode, "--out", str(Path(tmp) / mode)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
            if res.returncode or not lines:
                sys.exit(f"{mode} run failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
            results[mode] = json.loads(lines[-1][len("RESULT "):])
    full, lora = results["full"], results["lora"]
    gpu = full["gpu_peak_mb"] is not None
    t = Table(title=f"CRFT, {args.steps} timed steps ({args.recipe}, LoRA r={args.r})")
    for col in ("", "trainable params", "tokens/s", "peak RSS MB") + (("GPU peak MB",) if gpu else ()):
        t.add_column(col, justify="right")

    def row(name: str, r: dict) -> list[str]:
        cells = [name, f"{r['trainable']:,}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mb']:.0f}"]
        return cells + ([f"{r['gpu_peak_mb']:.0f}"] if gpu else [])

    t.add_row(*row("full", full))
    t.add_row(*row("lora", lora))
    ratio = ["lora / full", f"{lora['trainable'] / full['trainable']:.4f}",
             f"{lora['tokens_per_s'] / full['tokens_per_s']:.2f}", f"{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}"]
    if gpu:
        ratio.append(f"{lora['gpu_peak_mb'] / full['gpu_peak_mb']:.2f}")
    t.add_row(*ratio)
    Console(highlight=False).print(t)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
