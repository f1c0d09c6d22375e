"""Statistics of a preference file, with the length baseline a trained model must beat.

In DSP the domain responses are about twice as long as `normal`, so "prefer the longer
response" already ranks most pairs correctly; `longer_preferred` reports that floor beside
the size and length profile of the data.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol

from rmkit.data.records import Record, tied_pairs
from rmkit.errors import RmkitError

PERCENTILES = (50, 90, 99)


class Tokenizer(Protocol):
    def __call__(self, text: list[str], add_special_tokens: bool = ...) -> Any: ...


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and max (each an actual value of the data; zeros when empty)."""
    if not values:
        return {**{f"p{p}": 0 for p in PERCENTILES}, "max": 0}
    s = sorted(values)
    out = {f"p{p}": s[max(1, math.ceil(p / 100 * len(s))) - 1] for p in PERCENTILES}
    out["max"] = s[-1]
    return out


def _token_lengths(tokenizer: Tokenizer, texts: list[str], batch: int = 1024) -> list[int]:
    lengths: list[int] = []
    for i in range(0, len(texts), batch):
        ids = tokenizer(texts[i: i + batch], add_special_tokens=False)["input_ids"]
        lengths.extend(len(x) for x in ids)
    return lengths


def compute_stats(records: list[Record], tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Counts, responses per record, length percentiles (characters, and tokens with a tokenizer)
    and the share of strictly ordered pairs whose preferred response is strictly longer."""
    per_record = [len(r.responses) for r in records]
    pairs = longer = same_length = ties = 0
    for r in records:
        ties += len(tied_pairs(r.scores))
        for i, j in r.pairs():
            pairs += 1
            a, b = len(r.responses[i]), len(r.responses[j])
            longer += a > b
            same_length += a == b
    prompts = [r.prompt for r in records]
    responses = [t for r in records for t in r.responses]
    stats: dict[str, Any] = {
        "records": len(records),
        "pairs": pairs,
        "ties": ties,
        "responses_per_record": {
            "min": min(per_record, default=0),
            "mean": sum(per_record) / len(per_record) if per_record else 0.0,
            "max": max(per_record, default=0),
        },
        "prompt_chars": percentiles([len(p) for p in prompts]),
        "response_chars": percentiles([len(t) for t in responses]),
        "longer_preferred": longer / pairs if pairs else None,
        "same_length_pairs": same_length,
    }
    if tokenizer is not None:
        stats["prompt_tokens"] = percentiles(_token_lengths(tokenizer, prompts))
        stats["response_tokens"] = percentiles(_token_lengths(tokenizer, responses))
    return stats


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """`rmkit.tokenizer.load_tokenizer` (local files only, pad as everywhere else) for `rmkit
    data stats --tokenizer`, with the folder's problems as user-facing errors."""
    if not os.path.isdir(path):
        raise RmkitError(f"no tokenizer folder at {path}",
                         hint="pass a local folder holding tokenizer files (e.g. a saved model checkpoint)")
    from rmkit.tokenizer import load_tokenizer as load  # heavy (transformers): only when token lengths are asked for

    try:
        return load(path)
    except Exception as e:  # transformers raises several types for an incomplete folder
        raise RmkitError(f"cannot load a tokenizer from {path}: {e}",
                         hint="the folder needs tokenizer.json or the slow tokenizer's files") from None
