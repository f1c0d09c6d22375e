"""Atomic file and folder writes, and hashing.

Every file rmkit writes goes through here: written under a temporary name in the same folder,
flushed to disk, then renamed into place. An interrupted command leaves the old file or
nothing, never half a file that looks whole.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from rmkit.errors import RmkitError

TMP_PREFIX = ".tmp-"
# Errors that mean "this disk cannot take the write", wherever in the block they are raised.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def free_space(path: str | os.PathLike[str]) -> str:
    """Free space on the file system holding `path` (or its nearest existing parent), for messages."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "unknown free space"
    if free < 1024:
        return f"{free} bytes free"
    size, units = float(free), ("KiB", "MiB", "GiB", "TiB")
    for unit in units:
        size /= 1024
        if size < 1024 or unit == units[-1]:
            break
    return f"{size:.1f} {unit} free"


def write_error(path: str | os.PathLike[str], e: OSError) -> RmkitError:
    """An OSError while writing `path` as the user-facing error: what failed, where, free space."""
    what = e.strerror or str(e)
    hint = {
        errno.ENOSPC: "free some space (or write somewhere else) and run the command again",
        errno.EDQUOT: "your disk quota is used up; free some space and run the command again",
        errno.EROFS: "the file system is read-only; write somewhere else",
        errno.EACCES: "you may not write there; pick another output folder",
        errno.ENOTDIR: "a part of the output path is a file, not a folder",
        errno.EEXIST: "a part of the output path is a file, not a folder",
    }.get(e.errno or 0, "check the output path")
    return RmkitError(f"cannot write {path}: {what} ({free_space(path)})", hint=hint)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success fsync and rename it onto `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    except OSError as e:
        raise write_error(path, e) from None
    binary = "b" in mode
    ours = False  # an OSError from our own flush/fsync/rename (not from the caller's block)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            ours = True
            f.flush()
            os.fsync(f.fileno())
        ours = True  # close() flushes too
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and (ours or e.errno in DISK_ERRNOS):
            raise write_error(path, e) from None
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line; returns the number of rows written."""
    n = 0
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


@contextlib.contextmanager
def staging_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside `path` for a block that publishes it itself (`atomic_dir`
    below, `checkpoint.finalize` in `rmkit merge`): whatever the block leaves unpublished is
    removed, on success or failure, so an interrupted build leaves nothing behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
    except BaseException as e:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise write_error(path, e) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder under a temporary name; rename it onto `path` only when the block succeeds.

    An existing `path` is replaced only after the new folder is complete.
    """
    path = Path(path)
    with staging_dir(path) as tmp:
        yield tmp
        try:
            publish_dir(tmp, path)
        except OSError as e:
            raise write_error(path, e) from None


def publish_dir(tmp: Path, dest: Path) -> None:
    """fsync every file of a finished folder, then rename it onto `dest` (an existing `dest` is
    moved aside first and removed only after the new folder is in place)."""
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


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
