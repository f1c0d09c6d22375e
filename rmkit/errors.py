"""The one user-facing error type.

Anything the user can fix (a bad file, a bad recipe, a wrong flag) is raised as `RmkitError`
with the place, the problem and a hint. The CLI prints it without a traceback and exits 2.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class RmkitError(Exception):
    """A problem the user can fix: `where` (file:line, record, field), `problem`, `hint`."""

    def __init__(self, problem: str, hint: str | None = None, where: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint
        self.where = where

    def render(self) -> str:
        head = f"{self.where}: {self.problem}" if self.where else self.problem
        return head if not self.hint else f"{head}\n  hint: {self.hint}"

    def __str__(self) -> str:  # so logs and pytest show the whole message
        return self.render()
