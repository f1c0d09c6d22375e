"""`rmkit merge ADAPTER_CKPT -o OUT`: fold a LoRA adapter (and its reward head) into the base."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def merge(
        adapter: Path = typer.Argument(..., metavar="ADAPTER_CKPT", help="Adapter checkpoint: RUN/final or RUN/checkpoints/step-N of a LoRA run."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the merged model (written atomically)."),
        base: Optional[Path] = typer.Option(None, "--base", help="Base model folder, if it moved from the path in meta.json."),
        dtype: str = typer.Option("fp32", "--dtype", help="Weights of the merged model: fp32 or bf16."),
    ) -> None:
        """Merge a LoRA adapter checkpoint into its base: a full Hugging Face reward-model folder."""
        from rmkit.console import console
        from rmkit.merge import FP_SHOWN
        from rmkit.merge import merge as run_merge

        res = run_merge(adapter, out, base, dtype)
        if res.skipped:
            console.print(f"{out} already holds this merge (adapter fingerprint {res.adapter_fingerprint[:FP_SHOWN]}, "
                          f"{dtype}); nothing to do")
            return
        console.print(f"merged {res.layers} LoRA layers of {adapter} into base {res.base} ({dtype}) "
                      f"in {res.seconds:.1f}s")
        console.print(f"check: {res.pairs} pairs scored unmerged (base + adapter) and merged ({res.loader}): "
                      f"largest reward difference {res.max_diff:.3g} (tolerance {res.tolerance:.3g})")
        console.print(f"[bold green]done[/]: {out}")
