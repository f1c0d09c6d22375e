"""One AdamW step on CPU over a real model's parameters: torch's per-tensor loop, foreach, fused.

    python bench/adamw_step.py                 # smollm2-135m, 2 threads, 5 timed steps each

Why rmkit's CPU config sets `fused: true` (rmkit/train/rundir.py): the optimizer step runs once per
global batch over every parameter, and at bf16, where matmuls are fast, the per-tensor loop was a
quarter of a GRFT step. Prints the median and [min, max] seconds per step and the ratio to the loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    from rmkit.hardware import cpu_flags
    from rmkit.models import resolve_model

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    shapes = [q.shape for q in model.parameters()]
    del model
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags())
    table = Table(title=f"AdamW step, {args.model} ({sum(s.numel() for s in shapes) / 1e6:.1f}M parameters, fp32), "
                        f"{args.threads} threads; flags: {flags}")
    for col in ("implementation", "s/step median [min, max]", "vs loop"):
        table.add_column(col)
    base = None
    for name, kw in (("per-tensor loop (torch's CPU default)", {"foreach": False}), ("foreach", {"foreach": True}),
                     ("fused (rmkit on CPU)", {"fused": True})):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        for q in params:
            q.grad = torch.randn_like(q) * 1e-3
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, **kw)
        opt.step()  # state allocated outside the timing
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        base = base or med
        table.add_row(name, f"{med:.3f} [{min(times):.3f}, {max(times):.3f}]", f"{base / med:.1f}x")
        del params, opt
    Console().print(table)


if __name__ == "__main__":
    main()
