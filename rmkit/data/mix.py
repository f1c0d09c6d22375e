"""Weighted, seeded mixing of preference sources (the paper's general-preference enrichment).

Weights are given for all sources or for none, normalized, and turned into counts by
largest-remainder rounding, so the counts always sum to the requested size. A source is never
silently oversampled: asking for more records than it holds is an error unless repetition is
allowed explicitly. All randomness comes from one `random.Random(seed)`, so a mix is
reproducible byte for byte.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

from rmkit import __version__
from rmkit.data.readers import load_source
from rmkit.data.records import Record, write_records
from rmkit.errors import RmkitError
from rmkit.io import atomic_write_json, sha256_file

Source = tuple[str, list[Record], float | None]


def parse_source(spec: str) -> tuple[str, float | None]:
    """`PATH[:WEIGHT]` -> (path, weight); a tail after the last ':' that is not a number stays in the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, None


def _normalized(sources: list[Source]) -> list[Fraction] | None:
    weights = [w for _, _, w in sources]
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        missing = [name for name, _, w in sources if w is None]
        raise RmkitError(f"weights given for some sources but not for {', '.join(missing)}",
                         hint="give a weight to every source (PATH:WEIGHT) or to none (all records of every source)")
    if not any(given):
        return None
    for name, _, w in sources:
        assert w is not None
        if not math.isfinite(w) or w < 0:
            raise RmkitError(f"weight {w} for {name} must be a finite number >= 0")
    # Exact decimal weights (0.7 is 7/10, not its binary approximation) so rounding ties are exact.
    exact = [Fraction(repr(float(w))) for _, _, w in sources if w is not None]
    total = sum(exact)
    if total == 0:
        raise RmkitError("all weights are 0", hint="give at least one source a positive weight")
    return [w / total for w in exact]


def largest_remainder(size: int, shares: list[Fraction]) -> list[int]:
    """Integer counts summing to `size`, each within 1 of size*share; ties go to the earlier source."""
    exact = [size * s for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: size - sum(counts)]:
        counts[i] += 1
    return counts


def _max_size(available: list[int], shares: list[Fraction]) -> int:
    """The largest size whose rounded counts fit every source without repetition."""
    upper = min(math.floor((a + 1) / s) for a, s in zip(available, shares) if s > 0)
    for n in range(upper, -1, -1):
        if all(c <= a for c, a in zip(largest_remainder(n, shares), available)):
            return n
    return 0


def _take(records: list[Record], count: int, rng: random.Random) -> list[Record]:
    """`count` records: whole passes over the source, then a seeded sample without repetition."""
    passes, rest = divmod(count, len(records)) if records else (0, 0)
    return records * passes + [records[i] for i in sorted(rng.sample(range(len(records)), rest))]


def mix_records(sources: list[Source], size: int | None, seed: int,
                allow_repeat: bool = False) -> tuple[list[Record], dict[str, int]]:
    """Mix (name, records, weight) sources into one shuffled list; returns it and per-source counts.

    No weights: every record of every source (`size` must be None). Weights: counts by
    largest-remainder rounding of size*weight; without `size`, the largest size that needs no
    repetition. More than a source holds is an error unless `allow_repeat`.
    """
    if not sources:
        raise RmkitError("no sources to mix", hint="pass at least one --source PATH[:WEIGHT]")
    names = [name for name, _, _ in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RmkitError(f"source listed twice: {', '.join(dupes)}", hint="give each source once, with its combined weight")
    for name, records, _ in sources:
        if not records:
            raise RmkitError(f"source {name} holds no records")
    if size is not None and size < 0:
        raise RmkitError(f"--size must be >= 0, got {size}")
    shares = _normalized(sources)
    available = [len(r) for _, r, _ in sources]
    if shares is None:
        if size is not None:
            raise RmkitError("--size needs weights", hint="give every source a weight (PATH:WEIGHT), or drop --size to take all records")
        counts = available
    else:
        counts = largest_remainder(_max_size(available, shares) if size is None else size, shares)
    rng = random.Random(seed)
    mixed: list[Record] = []
    for (name, records, _), count in zip(sources, counts):
        if count > len(records) and not allow_repeat:
            raise RmkitError(f"source {name} has {len(records)} records but the mix asks for {count}",
                             hint="lower --size or this source's weight, or pass --allow-repeat to repeat records "
                                  "(whole passes plus a seeded sample)")
        mixed.extend(_take(records, count, rng))
    rng.shuffle(mixed)
    return mixed, dict(zip(names, counts))


def sha256_path(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_file(f).encode() + b"\0")
    return h.hexdigest()


def manifest_path(output: str | os.PathLike[str]) -> Path:
    """`OUT.jsonl` -> `OUT.manifest.json` beside it."""
    output = Path(output)
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".manifest.json")


def mix_files(specs: list[str], output: str | os.PathLike[str], size: int | None, seed: int,
              allow_repeat: bool = False) -> dict[str, Any]:
    """Load each `PATH[:WEIGHT]`, mix, write the records and a manifest; returns the manifest."""
    parsed = [parse_source(s) for s in specs]
    _normalized([(p, [], w) for p, w in parsed])  # fail on mixed weights before reading any file
    loaded = [(p, load_source(p), w) for p, w in parsed]
    sources: list[Source] = [(p, res.records, w) for p, res, w in loaded]
    mixed, counts = mix_records(sources, size, seed, allow_repeat)
    shares = _normalized(sources)
    manifest = {
        "rmkit_version": __version__,
        "seed": seed,
        "size": len(mixed),
        "size_requested": size,
        "allow_repeat": allow_repeat,
        "output": Path(output).name,
        "sources": [
            {"path": p, "sha256": sha256_path(p), "format": res.format, "records_available": len(res.records),
             "records_taken": counts[p], "weight": w,
             "weight_normalized": float(shares[i]) if shares is not None else None}
            for i, (p, res, w) in enumerate(loaded)
        ],
    }
    write_records(output, mixed)
    try:
        atomic_write_json(manifest_path(output), manifest)
    except BaseException:
        Path(output).unlink(missing_ok=True)  # a mix without its manifest is not reproducible
        raise
    return manifest
