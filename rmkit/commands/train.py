"""`rmkit train blt|grft|crft`: validate the recipe, data and parent; write the run directory;
start the `deepspeed` launcher on `rmkit.train.worker`."""

from __future__ import annotations

from typing import List, Optional

import typer

STAGE_HELP = {
    "blt": "Base LM Training: causal language modelling on text.",
    "grft": "General RM Fine-tuning: ranking loss on general preference pairs (HH, WebGPT).",
    "crft": "Customized RM Fine-tuning: continue a GRFT checkpoint on one domain's preferences.",
}


def _make(stage: str):  # type: ignore[no-untyped-def]
    def command(
        recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=f"Recipe YAML (default recipes/{stage}.yaml)."),
        domain: Optional[str] = typer.Option(None, "--domain", "-d", help="Domain for CRFT: academy, business, entertainment, literature."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe field: key.sub=value (repeatable)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the launcher command and resolved recipe; start nothing."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
    ) -> None:
        from rmkit.recipe import default_recipe_path, load_recipe
        from rmkit.train.launch import train

        r = load_recipe(recipe or default_recipe_path(stage), set_, stage=stage, domain=domain)
        code = train(r, resume=resume, dry_run=dry_run)
        if code:
            raise typer.Exit(code)

    command.__doc__ = STAGE_HELP[stage]
    return command


def register(app: typer.Typer) -> None:
    train_app = typer.Typer(help="Train a stage: blt, grft or crft (DeepSpeed launches from recipes).", no_args_is_help=True)
    for stage in ("blt", "grft", "crft"):
        train_app.command(name=stage, help=STAGE_HELP[stage])(_make(stage))
    app.add_typer(train_app, name="train")
