"""Fault injection for the reliability tests (`tests/test_faults.py`, `bench/fault_soak.py`).

`RMKIT_FAULT=kind:step` (steps count from 1, as in metrics.jsonl):
  step:N       SIGKILL this rank right after optimizer step N
  save:N       SIGKILL in the middle of writing the checkpoint of step N (files written, no meta.json)
  eval:N       SIGKILL in the middle of the evaluation after step N
  nan:N        rank 0's loss becomes NaN in step N (the other ranks must learn it from the all-reduce)
  enospc:N     rank 0 fails with ENOSPC while writing the checkpoint of step N
  nanweights:N rank 0's copy of one weight becomes NaN just before the checkpoint of step N is written
Unset in normal use, where each hook costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal


def fault_at(kind: str, step: int) -> bool:
    """True when RMKIT_FAULT names this kind and step."""
    spec = os.environ.get("RMKIT_FAULT")
    if not spec:
        return False
    want_kind, _, want_step = spec.partition(":")
    return want_kind == kind and want_step.isdigit() and int(want_step) == step


def maybe_die(phase: str, step: int) -> None:
    if fault_at(phase, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_enospc(step: int, path: str) -> None:
    """Raise what a full disk raises while writing `path`."""
    if fault_at("enospc", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
