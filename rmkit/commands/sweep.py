"""`rmkit sweep imitation`: grid over imitation weight x general enrichment, one CRFT run each."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    sweep_app = typer.Typer(help="Sweeps over CRFT knobs (real launches, resumable).", no_args_is_help=True)

    @sweep_app.command()
    def imitation(
        recipe: str = typer.Option("recipes/cpu/crft.yaml", "--recipe", "-r", help="Base CRFT recipe."),
        domain: str = typer.Option(..., "--domain", "-d", help="academy, business, entertainment or literature."),
        weights: str = typer.Option("0,0.1,0.5,1", "--weights", help="Imitation-loss weights, comma-separated."),
        enrich: str = typer.Option("0", "--enrich", help="Shares of general pairs mixed into CRFT data, e.g. 0,0.25,0.5."),
        from_: Optional[str] = typer.Option(None, "--from", help="GRFT checkpoint to start every point from (default: the recipe's model.path)."),
        general: str = typer.Option("${RMKIT_DATA:-../shared/data}/helpful.json", "--general",
                                    help="General pairs for enrichment when the recipe has only the domain source."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Override for every point: key.sub=value."),
        out: str = typer.Option(..., "-o", "--out", help="Sweep folder (sweep.json, sweep.csv, tradeoff.png, points/)."),
    ) -> None:
        """One CRFT run per (weight, enrichment) point, evaluated on domain and general test pairs."""
        from pathlib import Path

        from rmkit.sweep import parse_grid, run_sweep

        run_sweep(recipe, domain, parse_grid(weights, "weights"), parse_grid(enrich, "enrich"), Path(out),
                  parent=from_, general=general, extra=set_)

    app.add_typer(sweep_app, name="sweep")
