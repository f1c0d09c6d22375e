"""What a run does when a loss, a gradient or a weight stops being finite (`train.on_nonfinite`).

stop (default): raise on every rank, naming the step and the last good checkpoint, before any
weights are written. skip: go on; the NaN gradients make the engine drop the whole update on
every rank (DeepSpeed's ZeRO optimizers do; the engines guard ZeRO-0 and the local optimizer the
same way), and the skipped step is logged in metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from rmkit.console import print0
from rmkit.io import write_error
from rmkit.train.engine import Engine


class NonfinitePolicy:
    """One per run; every rank calls it at the same points, so the decisions agree."""

    def __init__(self, mode: str, engine: Engine, metrics_path: Path, last_good: Callable[[], str]) -> None:
        self.mode = mode
        self.engine = engine
        self.metrics_path = metrics_path
        self.last_good = last_good
        self.nan_loss_steps: set[int] = set()  # 1-based steps whose loss was not finite (skip mode)
        self.skips_seen: int | None = None  # engine.skipped_steps when last settled

    def check_loss(self, loss: torch.Tensor, step: int) -> None:
        """All ranks together, on every micro-batch of 0-based `step`: is any rank's loss non-finite?"""
        finite = torch.tensor([float(torch.isfinite(loss.detach()).item())])
        if self.engine.all_reduce(finite).item() >= self.engine.world:
            return
        if self.mode == "skip":
            self.nan_loss_steps.add(step + 1)
            return
        self.engine.stop(f"non-finite loss at step {step + 1}; stopped before writing any weights",
                         hint=f"last good checkpoint: {self.last_good()}. Lower train.lr, check the data, or use "
                              "fp32 (launch.precision: fp32); train.on_nonfinite: skip skips such steps instead")

    def settle(self, done: int) -> None:
        """Account for the update of step `done` (1-based, the last completed one): the engine
        counts updates it dropped for non-finite gradients. skip: log it; stop: stop."""
        skipped = self.engine.skipped_steps
        seen, self.skips_seen = self.skips_seen, skipped
        nan_loss = done in self.nan_loss_steps
        if seen is None or done < 1 or (skipped == seen and not nan_loss):
            return
        self.nan_loss_steps.discard(done)  # settled: reported once
        if skipped == seen:  # a NaN loss whose gradients came out finite: the update was applied
            self._log(done, False, "non-finite loss, finite gradients: update applied")
            return
        if self.mode != "skip":
            self.engine.stop(f"non-finite gradients at step {done}; the engine dropped that update, so the weights "
                             "are unchanged; stopped before writing any weights",
                             hint=f"last good checkpoint: {self.last_good()}. Lower train.lr or train.grad_clip, "
                                  "check the data; train.on_nonfinite: skip skips such steps instead")
        self._log(done, True, "non-finite loss" if nan_loss else "non-finite gradients")

    def _log(self, done: int, skipped: bool, reason: str) -> None:
        print0(f"[yellow]step {done}: {reason}{' (update skipped)' if skipped else ''}[/]")
        if self.engine.rank == 0:  # its own line, after the step's row (Progress flushes each row)
            try:
                with open(self.metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": done, "skipped": skipped, "reason": reason}) + "\n")
            except OSError as e:
                raise write_error(self.metrics_path, e) from None
