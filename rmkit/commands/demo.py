"""`rmkit demo`: BLT -> GRFT -> CRFT on the built-in SmolLM2-135M, then a results table."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: str = typer.Option("runs/demo", "--out", "-o", help="Folder for the runs (replaced on each demo)."),
        domain: str = typer.Option("business", "--domain", "-d", help="Customized domain for CRFT."),
        eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Held-out pairs per eval set (default 100; at least 100 for useful intervals)."),
        blt: bool = typer.Option(False, "--blt", help="Run BLT (LM training on HH text) before GRFT, as the paper does."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Extra override for every stage, e.g. launch.gpus=2 (not train.output_dir: use --out)."),
    ) -> None:
        """Run GRFT -> CRFT (with --blt: BLT -> GRFT -> CRFT) end to end on this machine, then a results table."""
        from pathlib import Path

        from rmkit.demo import EVAL_LIMIT, run_demo

        run_demo(Path(out), domain, EVAL_LIMIT if eval_limit is None else eval_limit, set_, blt=blt)
