"""The canonical preference record and its JSONL storage.

One record = one prompt with two or more responses and a score per response (higher is
preferred, equal scores are ties and carry no preference). A pair is the two-response case;
DSP's five responses to a query can be kept as one ranked group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from rmkit.errors import RmkitError
from rmkit.io import atomic_write_jsonl

DOMAINS = ("academy", "business", "entertainment", "literature")
DSP_KEYS = DOMAINS + ("normal",)


def strict_pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    """Every ordered (better, worse) index pair with scores[better] > scores[worse], better
    ascending then worse ascending: the one place the pair rule is written (collation, scoring,
    stats and the readers' drop rule all call it, so every count of "pairs" agrees)."""
    n = len(scores)
    return [(a, b) for a in range(n) for b in range(n) if scores[a] > scores[b]]


def tied_pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    """Every unordered index pair (i < j) with equal scores: the pairs a tie removes, counted
    once each (eval's `ties_skipped` and `rmkit data stats` report this number)."""
    n = len(scores)
    return [(a, b) for a in range(n) for b in range(a + 1, n) if scores[a] == scores[b]]


def preferred_index(scores: Sequence[float]) -> int | None:
    """Index of the unique top score, None when the top is shared (ties carry no preference):
    the one place the rule is written (imitation targets under the "token" reduction and eval's
    best-vs-runner-up group figure call it)."""
    top = max(scores)
    best = [i for i, s in enumerate(scores) if s == top]
    return best[0] if len(best) == 1 else None


@dataclass(frozen=True)
class Record:
    """prompt: the text before the responses (already in its dialogue template, ending where the
    response starts); responses: the candidate continuations; scores: one per response."""

    prompt: str
    responses: tuple[str, ...]
    scores: tuple[float, ...]
    source: str = ""
    domain: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def pairs(self) -> list[tuple[int, int]]:
        """Every ordered (better, worse) index pair with a strict score difference."""
        return strict_pairs(self.scores)

    def preferred(self) -> int | None:
        """Index of the unique best response, or None when the top score is shared."""
        return preferred_index(self.scores)

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "prompt": self.prompt,
            "responses": list(self.responses),
            "scores": list(self.scores),
            "source": self.source,
            "domain": self.domain,
        }
        if self.meta:
            row["meta"] = self.meta
        return row

    @staticmethod
    def from_json(row: Any, where: str) -> "Record":
        """Validate one canonical row; `where` names the file and line for error messages."""
        if not isinstance(row, dict):
            raise RmkitError(f"expected a JSON object, got {type(row).__name__}", where=where,
                             hint="each line of a canonical file is one record object")
        missing = [k for k in ("prompt", "responses", "scores") if k not in row]
        if missing:
            raise RmkitError(f"missing field(s) {', '.join(missing)}", where=where,
                             hint="a canonical record has prompt, responses, scores (and optional source, domain); "
                                  "convert other formats with `rmkit data convert`")
        prompt, responses, scores = row["prompt"], row["responses"], row["scores"]
        if not isinstance(prompt, str):
            raise RmkitError(f"field 'prompt' must be a string, got {type(prompt).__name__}", where=where)
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise RmkitError("field 'responses' must be a list of strings", where=where)
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise RmkitError("field 'scores' must be a list of numbers", where=where)
        if len(responses) < 2:
            raise RmkitError(f"a record needs at least 2 responses, got {len(responses)}", where=where)
        if len(responses) != len(scores):
            raise RmkitError(f"{len(responses)} responses but {len(scores)} scores", where=where,
                             hint="give exactly one score per response")
        domain = row.get("domain")
        if domain is not None and not isinstance(domain, str):
            raise RmkitError("field 'domain' must be a string or null", where=where)
        source = row.get("source", "")
        if not isinstance(source, str):
            raise RmkitError("field 'source' must be a string", where=where)
        meta = row.get("meta") or {}
        return Record(prompt, tuple(responses), tuple(float(s) for s in scores), source, domain, meta)


def parse_jsonl(lines: Iterable[str], path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, parsed_object) for each non-blank line (numbered from 1); bad JSON
    is an error naming `path:line`. The one JSONL parser: `iter_jsonl` (canonical files, eval's
    score-only rows) and the readers' JSONL container both call it. Lines end at "\n" only, so
    a U+2028 that `json.dumps(ensure_ascii=False)` left inside a string stays inside it; the
    "\n" is dropped first, so an error at a line's end names that line's column."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line.removesuffix("\n"))
        except json.JSONDecodeError as e:
            raise RmkitError(f"invalid JSON: {e.msg} (column {e.colno})", where=f"{path}:{lineno}",
                             hint="each line of a JSONL file must be one complete JSON object") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """`parse_jsonl` over a file, read as UTF-8 line by line (any size)."""
    path = Path(path)
    if not path.exists():
        raise RmkitError(f"no such file: {path}", hint="check the path (relative paths are resolved from the current folder)")
    with open(path, encoding="utf-8") as f:
        try:
            yield from parse_jsonl(f, path)
        except UnicodeDecodeError as e:
            raise RmkitError(f"not UTF-8 text ({e.reason})", where=str(path),
                             hint="rmkit reads JSONL as UTF-8; re-encode the file") from None


def read_records(path: str | Path) -> list[Record]:
    """Read a canonical JSONL file written by rmkit (or by hand in the same shape)."""
    records = [Record.from_json(obj, where=f"{path}:{lineno}") for lineno, obj in iter_jsonl(path)]
    if not records:
        raise RmkitError(f"{path} holds no records", hint="the file is empty; check how it was produced")
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    """Atomically write records as canonical JSONL; returns how many were written."""
    return atomic_write_jsonl(path, (r.to_json() for r in records))
