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
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, NoReturn, Protocol

from rmkit.errors import RmkitError
from rmkit.io import TMP_PREFIX, atomic_write_json, atomic_write_text, free_space, publish_dir, sha256_text

if TYPE_CHECKING:  # torch loads lazily: `rmkit eval --help` and folder checks need none of it
    import torch

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


def remove_temporaries(out_dir: Path) -> None:
    """Delete the `.tmp-` folders of saves that never finished (a kill mid-save leaves one)."""
    root = out_dir / "checkpoints"
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(TMP_PREFIX):
                shutil.rmtree(d, ignore_errors=True)


def prune(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale temporaries."""
    ckpts = list_checkpoints(out_dir)
    for _, d in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    remove_temporaries(out_dir)


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


class Ranks(Protocol):
    """What saving and loading need from the training engine (rmkit/train/engine.py)."""

    rank: int
    world: int

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor: ...
    def stop(self, problem: str, hint: str) -> NoReturn: ...
    def local(self, p: torch.Tensor) -> torch.Tensor: ...
    def save_state(self, folder: Path, client_state: dict[str, Any]) -> None: ...
    def load_state(self, folder: Path) -> dict[str, Any]: ...


STATE_DIR = "state"  # inside a training checkpoint: the engine's optimizer/scheduler state + RNG


def last_good(out_dir: Path) -> str:
    """The newest complete checkpoint, for messages that tell the user what is left."""
    last = list_checkpoints(out_dir)
    return str(last[-1][1]) if last else "none yet"


def check_finite(engine: Ranks, params: list[tuple[str, torch.Tensor]], dest: Path, step: int, out_dir: Path) -> None:
    """Every rank checks the weights it holds (its ZeRO-3 partition); all-reduced, so no rank
    writes a checkpoint that another rank's NaN has spoiled."""
    import torch

    count, names = nonfinite_names((n, engine.local(p)) for n, p in params)
    total = int(engine.all_reduce(torch.tensor([float(count)])).item())
    if total:
        engine.stop(f"refusing to write {dest}: {total} weight tensor(s) hold NaN or infinity at step {step}"
                    + (f" ({', '.join(names)})" if names else ""),
                    hint=f"last good checkpoint: {last_good(out_dir)}. Lower train.lr, check the data, or set "
                         "train.on_nonfinite: skip")


def save(engine: Ranks, out_dir: Path, step: int, final: bool, write_model: Callable[[Path], None],
         meta: Callable[[], dict[str, Any]], keep_last: int,
         before_publish: Callable[[Path], None] | None = None) -> Path:
    """Write OUT/checkpoints/step-N (with the engine state, for resuming) or OUT/final.

    All ranks write into a temporary folder; rank 0 writes meta.json last and renames. A write
    that fails on any rank (full disk, read-only folder) removes the temporary folder and stops
    every rank with the folder, the reason and the free space; earlier checkpoints are untouched.
    The ranks settle each phase with an all-reduce of their failures, so none waits forever.
    `before_publish(tmp)` runs on every rank after the files are written (fault injection).
    """
    dest = out_dir / "final" if final else step_dir(out_dir, step)
    tmp = dest.with_name(TMP_PREFIX + dest.name)
    failure: BaseException | None = None
    if engine.rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            failure = e
    _settle(engine, failure, dest, tmp, out_dir)
    try:
        if not final:
            engine.save_state(tmp / STATE_DIR, {"rmkit_step": step})
        write_model(tmp)
        if before_publish is not None:
            before_publish(tmp)
    except (OSError, RmkitError) as e:
        failure = e
    _settle(engine, failure, dest, tmp, out_dir)
    if engine.rank == 0:
        try:
            finalize(tmp, dest, meta())
            if not final:
                prune(out_dir, keep_last)
        except (OSError, RmkitError) as e:
            failure = e
    _settle(engine, failure, dest, tmp, out_dir)
    return dest


def _settle(engine: Ranks, failure: BaseException | None, dest: Path, tmp: Path, out_dir: Path) -> None:
    """The ranks' barrier after each save phase: all-reduce who failed; on any failure remove the
    temporary folder and stop on every rank."""
    import torch

    flags = torch.zeros(engine.world)
    flags[engine.rank] = float(failure is not None)
    flags = engine.all_reduce(flags)
    if not flags.any():
        return
    if failure is not None:
        reason = (f"{failure.strerror} ({failure.filename})" if isinstance(failure, OSError) and failure.strerror
                  else failure.problem if isinstance(failure, RmkitError) else str(failure))
    else:
        reason = f"rank(s) {', '.join(str(i) for i in flags.nonzero().flatten().tolist())} failed to write their part"
    free = free_space(dest.parent)  # measured before the unfinished folder is removed
    if engine.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    elif failure is not None:  # only rank 0's message is printed by worker.py; say ours here
        print(f"rank {engine.rank}: could not write {tmp}: {reason}", file=sys.stderr, flush=True)
    engine.stop(f"could not write checkpoint {dest}: {reason}; {free} on that disk",
                hint=f"the unfinished folder was removed; the last good checkpoint is intact: {last_good(out_dir)}. "
                     "Free some space (or lower train.keep_last), then continue with --resume")


def restore_latest(engine: Ranks, out_dir: Path, recipe_sha256: str) -> tuple[int, Path | None]:
    """Load the newest complete training checkpoint into the engine: (step to continue from,
    its folder), or (0, None) when there is none. Rank 0 first removes the temporary folders of
    saves a kill interrupted, so a resumed run that stops early leaves none behind."""
    if engine.rank == 0:
        remove_temporaries(out_dir)
    ckpts = list_checkpoints(out_dir)
    if not ckpts:
        return 0, None
    step, folder = ckpts[-1]
    meta = read_meta(folder)
    if meta.get("recipe_sha256") != recipe_sha256:
        raise RmkitError(f"checkpoint {folder} was trained with another recipe",
                         hint="resume with the same recipe and --set values")
    client = engine.load_state(folder / STATE_DIR)
    return int(client.get("rmkit_step", step)), folder


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
