"""Rich console output, shown by rank 0 only (other ranks stay quiet)."""

from __future__ import annotations

import os
import sys

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def print0(*args: object, **kwargs: object) -> None:
    if is_rank0():
        console.print(*args, **kwargs)  # type: ignore[arg-type]


def print_error(message: str) -> None:
    from rich.text import Text

    err_console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    print_error(message)
    sys.exit(code)
