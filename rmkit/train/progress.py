"""Rank-0 progress: a rich bar (step, loss parts, accuracy, lr, tokens/s, ETA), `metrics.jsonl`,
and TensorBoard when it is installed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from rmkit.console import console
from rmkit.io import atomic_write_text, write_error


class Progress:
    def __init__(self, total: int, start: int, metrics_path: Path, enabled: bool, stage: str) -> None:
        self.enabled = enabled
        self.total = total
        self.path = metrics_path
        self.stage = stage
        self.tb = None
        if not enabled:
            return
        self._truncate_after(start)
        self.file = open(metrics_path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(metrics_path.parent / "tensorboard"))
        except Exception:  # tensorboard not installed: metrics.jsonl is the record
            self.tb = None
        self.live = sys.stdout.isatty()
        self.bar = RichProgress(
            TextColumn(f"[bold]{stage}[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, disable=not self.live,
        )
        self.task = self.bar.add_task(stage, total=total, completed=start, info="")
        self.bar.start()

    def _truncate_after(self, start: int) -> None:
        """On resume, forget metrics logged after the checkpoint we restart from."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("step", 0) <= start and not row.get("final"):
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))  # a kill here keeps the old file

    def log(self, m: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: a clear error (exit 2), not a traceback
            raise write_error(self.path, e) from None
        if "loss_ranking" in m:
            parts = [f"loss {m['loss']:.4f}"]  # the weighted total that was backpropagated
            if self.stage != "blt":
                parts.append(f"rank {m['loss_ranking']:.4f}")
            if m["loss_imitation"]:
                parts.append(f"{'lm' if self.stage == 'blt' else 'imit'} {m['loss_imitation']:.4f}")
            if self.stage != "blt":
                parts.append(f"acc {m['accuracy']:.3f}")
            parts += [f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:.0f} tok/s"]
            info = "  ".join(parts)
            self.bar.update(self.task, completed=m["step"], info=info)
            if not self.live:
                console.print(f"{self.stage} step {m['step']}/{self.total}  {info}")
            if self.tb is not None:
                for k in ("loss", "loss_ranking", "loss_imitation", "accuracy", "lr", "tokens_per_s"):
                    self.tb.add_scalar(f"train/{k}", m[k], m["step"])
        for name, res in (m.get("eval") or {}).items():
            acc = res.get("accuracy", math.nan)
            console.print(f"  eval {name}: accuracy {acc:.4f} over {res.get('pairs')} pairs "
                          f"(length baseline {res.get('length_baseline', math.nan):.4f})")
            if self.tb is not None:
                self.tb.add_scalar(f"eval/{name}/accuracy", acc, m["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.stop()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
