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

import contextlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from rmkit.errors import RmkitError
from rmkit.io import TMP_PREFIX, atomic_write_json, atomic_write_text, publish_dir, sha256_text

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


def problems(folder: Path, limit: int = 3) -> list[str]:
    """Why `folder` is not a complete checkpoint (empty when it is): at most `limit` reasons.

    Complete means: not a `.tmp-` folder, meta.json parses to an object whose `files` table is
    non-empty, and every file it lists exists (inside the folder) with the recorded size.
    """
    meta_path = folder / META_FILE
    if folder.name.startswith(TMP_PREFIX):
        return ["it is a temporary folder of an unfinished save"]
    if not meta_path.is_file():
        return ["meta.json is missing (it is written last, so the save did not finish)"]
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"meta.json is unreadable ({getattr(e, 'msg', e)})"]
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        return ["meta.json has no file table ('files')"]
    out = []
    for name, size in files.items():
        rel = Path(str(name))
        if rel.is_absolute() or ".." in rel.parts:
            out.append(f"meta.json lists a file outside the folder: {name}")
        elif not (folder / rel).is_file():
            out.append(f"{name} is missing")
        elif (folder / rel).stat().st_size != size:
            out.append(f"{name} has {(folder / rel).stat().st_size} bytes, meta.json recorded {size}")
        if len(out) >= limit:
            break
    return out


def is_complete(folder: Path) -> bool:
    """True only when meta.json exists and every file it lists is present with its size."""
    return not problems(folder, limit=1)


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
    """meta.json of a complete checkpoint; anything else is refused, saying what is wrong."""
    why = problems(folder)
    if why:
        raise RmkitError(f"{folder} is not a complete rmkit checkpoint: " + "; ".join(why),
                         hint="a checkpoint is complete when meta.json lists every file with its size (an "
                              "interrupted save, or files changed after saving, break that); pick another one "
                              "(`ls OUT/checkpoints`) or OUT/final")
    return json.loads((folder / META_FILE).read_text(encoding="utf-8"))


def finalize(tmp: Path, dest: Path, meta: dict[str, Any]) -> None:
    """Write meta.json (with the file table) last, then rename tmp -> dest atomically."""
    meta = dict(meta)
    meta["files"] = file_table(tmp)
    meta["saved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(tmp / META_FILE, meta)
    publish_dir(tmp, dest)


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


def nonfinite_names(named: Iterable[tuple[str, Any]], limit: int = 3) -> tuple[int, list[str]]:
    """How many tensors hold a NaN or an infinity, and the first `limit` names: checked before any
    checkpoint is written, so a diverged run never leaves weights that look usable."""
    count, names = 0, []
    for name, t in named:
        if t.numel() and t.is_floating_point() and not bool(t.isfinite().all()):
            count += 1
            if len(names) < limit:
                names.append(name)
    return count, names


def check_weights(folder: Path, trust_remote_code: bool = False) -> None:
    """Refuse a model folder whose safetensors do not fit its config.json, before any process starts.

    The expected shapes come from the config alone (the model is built on the meta device, no
    memory); the file shapes come from the safetensors headers (nothing is loaded). Without this,
    weights of another base model, or a damaged file, fail deep inside every rank's loader.
    """
    import copy

    from safetensors import safe_open

    files = sorted(folder.glob("model*.safetensors")) + sorted(folder.glob("lm_head.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        return  # an adapter folder or an incomplete one: other checks name what is missing
    stamp = _checked_stamp(folder, [folder / "config.json", *files])
    if stamp.is_file():
        return  # these exact files passed before (building the skeleton costs seconds of imports)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    found[k] = (f.name, tuple(st.get_slice(k).get_shape()))
        except Exception as e:  # safetensors raises its own error type for a damaged header
            raise RmkitError(f"{f} is not a readable safetensors file ({e})", where="model.path",
                             hint="the file is damaged or is not safetensors (rmkit never loads pickle "
                                  "files); re-save the model with safe_serialization=True") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
        causal = copy.deepcopy(config)
        causal.architectures = None
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(causal, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise RmkitError(f"cannot build a model from {folder / 'config.json'}: {e}", where="model.path",
                         hint="config.json is damaged or names an architecture this transformers version "
                              "does not know") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    hidden = config.get_text_config().hidden_size
    expected["score.weight"] = (1, hidden)
    prefix = skeleton.base_model_prefix + "."
    wrong = [f"{found[k][0]}: {k} has shape {list(found[k][1])}, config.json implies {list(shape)}"
             for k, shape in expected.items() if k in found and found[k][1] != shape]
    # parameters only: a buffer (e.g. a causal mask) may legitimately be absent from the files
    missing = [k for k, _ in skeleton.named_parameters() if k.startswith(prefix) and k not in found]
    if wrong or missing:
        parts = wrong[:3] + ([f"{len(missing)} tensors are missing, e.g. {missing[0]}"] if missing else [])
        raise RmkitError(f"the weights in {folder} do not fit its config.json: " + "; ".join(parts),
                         where="model.path",
                         hint="the safetensors belong to another model (a different base model?) or are damaged; "
                              "point model.path at a folder whose weights and config.json were saved together")
    with contextlib.suppress(RmkitError):  # an unwritable cache only costs the check next time
        atomic_write_text(stamp, f"{folder}\n")


def _checked_stamp(folder: Path, files: list[Path]) -> Path:
    """A cache file named by the folder's path and its files' sizes and modification times."""
    from rmkit.models import cache_dir

    key = [str(folder.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return cache_dir() / "checked" / sha256_text("\n".join(key))
