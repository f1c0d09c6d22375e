"""Deterministic train/test split by a hash of the prompt.

Hashing the prompt (not the record) keeps every record of one prompt on the same side: the four
DSP domains of one query share the rendered prompt, so a query seen in training under one domain
can never leak into the test set under another. No RNG, no state: the same prompt, fraction and
salt always give the same side, in any process, for any file that holds that prompt.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Iterable

from rmkit import __version__
from rmkit.data.readers import load_source
from rmkit.data.records import Record, write_records
from rmkit.errors import RmkitError
from rmkit.io import atomic_write_json

TRAIN_FILE = "train.jsonl"
TEST_FILE = "test.jsonl"
MANIFEST_FILE = "split.manifest.json"


def _check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise RmkitError(f"test fraction must be between 0 and 1, got {fraction}", hint="e.g. --test 0.1 for 10%")


def bucket(prompt: str, salt: str = "") -> float:
    """The prompt's position in [0, 1): the first 8 bytes of sha256(salt NUL prompt) as a fraction."""
    digest = hashlib.sha256(salt.encode("utf-8") + b"\0" + prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(records: Iterable[Record], fraction: float, salt: str = "") -> tuple[list[Record], list[Record]]:
    """(train, test), each keeping the input order; one prompt never lands on both sides."""
    _check_fraction(fraction)
    train: list[Record] = []
    test: list[Record] = []
    for r in records:
        (test if bucket(r.prompt, salt) < fraction else train).append(r)
    return train, test


def split_file(path: str | os.PathLike[str], fraction: float, out_dir: str | os.PathLike[str], salt: str = "",
               domain: str | None = None) -> dict[str, Any]:
    """Split a file into DIR/train.jsonl and DIR/test.jsonl (+ manifest); an empty side is an error."""
    _check_fraction(fraction)
    if not 0.0 < fraction < 1.0:
        raise RmkitError(f"--test must be strictly between 0 and 1, got {fraction}",
                         hint="a split with an empty side is not a split; e.g. --test 0.1")
    result = load_source(path, domain=domain)
    train, test = split_records(result.records, fraction, salt)
    for side, recs in (("train", train), ("test", test)):
        if not recs:
            raise RmkitError(f"the {side} side would be empty ({len(result.records)} records, "
                             f"{len({r.prompt for r in result.records})} distinct prompts, --test {fraction})",
                             hint="use a fraction that leaves both sides some prompts, or a different --salt")
    out_dir = Path(out_dir)
    manifest = {
        "rmkit_version": __version__,
        "input": str(path),
        "format": result.format,
        "test_fraction": fraction,
        "salt": salt,
        "hash": "sha256(salt + NUL + prompt), first 8 bytes / 2**64 < fraction -> test",
        "train": {"file": TRAIN_FILE, "records": len(train), "prompts": len({r.prompt for r in train})},
        "test": {"file": TEST_FILE, "records": len(test), "prompts": len({r.prompt for r in test})},
    }
    write_records(out_dir / TRAIN_FILE, train)
    write_records(out_dir / TEST_FILE, test)
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest
