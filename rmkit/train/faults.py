"""Fault injection for the reliability tests (`tests/test_faults.py`, `bench/fault_soak.py`).

`RMKIT_FAULT=kind:step` (steps count from 1, as in metrics.jsonl):
  step:N       SIGKILL this rank right after optimizer step N
  save:N       SIGKILL in the middle of writing the checkpoint of step N (files written, no meta.json)
  eval:N       SIGKILL in the middle of the evaluation after step N
  nan:N        rank 0's loss becomes NaN in step N (the other ranks must learn it from the all-reduce)
  enospc:N     rank 0 fails with ENOSPC while writing the checkpoint of step N
  nanweights:N rank 0's copy of one weight becomes NaN just before the checkpoint of step N is written
The loop holds one `Faults`, read from the environment once; unset, every hook returns at once.
"""

from __future__ import annotations

import errno
import math
import os
import signal
from pathlib import Path
from typing import Callable

import torch


class Faults:
    """The injected fault of this process, if any, and the hooks the loop calls."""

    def __init__(self, spec: str | None, rank: int) -> None:
        kind, _, step = (spec or "").partition(":")
        self.kind = kind if step.isdigit() else ""
        self.step = int(step) if step.isdigit() else -1
        self.rank = rank

    @classmethod
    def from_env(cls, rank: int) -> "Faults":
        return cls(os.environ.get("RMKIT_FAULT"), rank)

    def at(self, kind: str, step: int) -> bool:
        return self.kind == kind and self.step == step

    def _die(self, phase: str, step: int) -> None:
        if self.at(phase, step):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, done: int) -> None:
        self._die("step", done)

    def during_eval(self, step: int) -> None:
        self._die("eval", step)

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The first micro-batch loss of 0-based `step`, NaN on rank 0 when asked."""
        return loss * float("nan") if self.rank == 0 and self.at("nan", step + 1) else loss

    def spoil_weights(self, step: int, params: list[tuple[str, torch.Tensor]], local: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.rank == 0 and self.at("nanweights", step):
            with torch.no_grad():
                first = next(p for _, p in params if p.requires_grad and local(p).numel())
                local(first).view(-1)[0] = math.nan

    def before_publish(self, step: int) -> Callable[[Path], None]:
        """Run after a checkpoint's files are written, before meta.json: a full disk or a kill."""
        def hook(tmp: Path) -> None:
            if self.rank == 0 and self.at("enospc", step):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.safetensors"))
            self._die("save", step)
        return hook
