"""The `rmkit` command line: one table from command group to the module that defines it.

Each command module under `rmkit/commands/` keeps heavy imports (torch, transformers,
deepspeed) inside its functions, so `rmkit --help` stays instant.
"""

from __future__ import annotations

import sys

import typer

from rmkit import __version__
from rmkit.errors import EXIT_USER_ERROR, RmkitError

app = typer.Typer(
    name="rmkit",
    help="Train customized reward models: BLT -> GRFT -> CRFT on DeepSpeed (Cheng et al., 2023).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """rmkit: customized reward models on DeepSpeed."""


def _register() -> None:
    # The table: command group -> module. Importing these modules must not import torch.
    from rmkit.commands import data as data_cmd
    from rmkit.commands import recipe as recipe_cmd

    app.add_typer(data_cmd.app, name="data")
    app.add_typer(recipe_cmd.app, name="recipe")
    for optional in ("train", "eval", "score", "merge", "sweep", "demo", "serve"):
        try:
            module = __import__(f"rmkit.commands.{optional}", fromlist=["register"])
        except ModuleNotFoundError as e:  # a command a later issue delivers is simply absent
            if e.name != f"rmkit.commands.{optional}":
                raise
            continue
        module.register(app)


_register()


def main() -> None:
    """Entry point: user errors print one clear message and exit 2, never a traceback."""
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code here instead of raising
        if isinstance(code, int) and code:
            sys.exit(code)
    except RmkitError as e:
        from rmkit.console import fail

        fail(e.render(), EXIT_USER_ERROR)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        click_errors: tuple[type[Exception], ...] = (click.ClickException,)
        try:  # typer >= 0.2x raises its vendored click's exceptions, not click's
            from typer._click.exceptions import ClickException as TyperClickException

            click_errors += (TyperClickException,)
        except ImportError:
            pass
        if isinstance(e, click_errors):
            e.show()
            sys.exit(EXIT_USER_ERROR)
        raise
