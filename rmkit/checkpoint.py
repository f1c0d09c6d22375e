"""Checkpoints: a Hugging Face model folder plus rmkit's lineage, written so a kill never leaves a
folder that loads as if it were whole.

CKPT/ (OUT/checkpoints/step-000100 or OUT/final)
  model.safetensors, config.json, tokenizer files   -> AutoModelForSequenceClassification loads it
  meta.json      stage, domain, parent, data manifest hash, recipe hash, step, version, git commit,
                 and `files`: name -> size of every file above (written last)
  state/         (training checkpoints only) DeepSpeed's optimizer/scheduler state + per-rank RNG

Every rank writes into `.tmp-step-N/`; after a barrier rank 0 writes meta.json and renames the
folder into place. Only folders whose meta.json lists files that all exist with the right sizes
are listed or loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rmkit.errors import RmkitError
from rmkit.io import TMP_PREFIX, atomic_write_json, fsync_dir

META_FILE = "meta.json"
STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step-{step:06d}"


def file_table(folder: Path) -> dict[str, int]:
    """Every file below `folder` (relative path -> size), meta.json excluded."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != META_FILE:
            out[f.relative_to(folder).as_posix()] = f.stat().st_size
    return out


def is_complete(folder: Path) -> bool:
    """True only when meta.json exists and every file it lists is present with its size."""
    meta_path = folder / META_FILE
    if folder.name.startswith(TMP_PREFIX) or not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete training checkpoints, oldest first."""
    root = out_dir / "checkpoints"
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = STEP_RE.match(d.name)
            if m and d.is_dir() and is_complete(d):
                found.append((int(m.group(1)), d))
    return sorted(found)


def read_meta(folder: Path) -> dict[str, Any]:
    if not is_complete(folder):
        raise RmkitError(f"{folder} is not a complete rmkit checkpoint",
                         hint="a checkpoint is complete when meta.json lists every file; pick another one "
                              "(`ls OUT/checkpoints`) or OUT/final")
    return json.loads((folder / META_FILE).read_text())


def finalize(tmp: Path, dest: Path, meta: dict[str, Any]) -> None:
    """Write meta.json (with the file table) last, then rename tmp -> dest atomically."""
    meta = dict(meta)
    meta["files"] = file_table(tmp)
    meta["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(tmp / META_FILE, meta)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if dest.exists():
        old = dest.with_name(TMP_PREFIX + dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fsync_dir(dest.parent)


def prune(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temporaries."""
    root = out_dir / "checkpoints"
    ckpts = list_checkpoints(out_dir)
    for _, d in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(TMP_PREFIX):
                shutil.rmtree(d, ignore_errors=True)
