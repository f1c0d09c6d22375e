"""`rmkit recipe validate|show`: check a recipe (every error at once) and print it resolved."""

from __future__ import annotations

from typing import List, Optional

import typer

app = typer.Typer(help="Validate and show training recipes.", no_args_is_help=True)


@app.command()
def validate(
    paths: List[str] = typer.Argument(..., help="Recipe YAML files."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field: key.sub=value."),
) -> None:
    """Validate recipes; all problems of a file are reported at once."""
    from rmkit.console import console
    from rmkit.recipe import load_recipe

    for p in paths:
        r = load_recipe(p, set_)
        console.print(f"[green]ok[/] {p} ({r.stage}{', domain ' + r.domain if r.domain else ''})")


@app.command()
def show(
    path: str = typer.Argument(..., help="Recipe YAML file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a field: key.sub=value."),
    domain: Optional[str] = typer.Option(None, "--domain", help="Set the domain (CRFT)."),
) -> None:
    """Print the resolved recipe: defaults filled in, overrides applied, ${ENV} expanded."""
    from rmkit.console import console
    from rmkit.recipe import dump_recipe, load_recipe

    console.print(dump_recipe(load_recipe(path, set_, domain=domain)), markup=False, end="")
