"""Fault injection for the kill/resume tests: `RMKIT_FAULT=phase:step` SIGKILLs this rank at a
named moment (phase `step` after an optimizer step, `save` in the middle of a checkpoint write,
`eval` in the middle of an evaluation). Unset in normal use, where it costs one dict lookup."""

from __future__ import annotations

import os
import signal


def maybe_die(phase: str, step: int) -> None:
    spec = os.environ.get("RMKIT_FAULT")
    if not spec:
        return
    want_phase, _, want_step = spec.partition(":")
    if want_phase == phase and want_step.isdigit() and int(want_step) == step:
        os.kill(os.getpid(), signal.SIGKILL)
