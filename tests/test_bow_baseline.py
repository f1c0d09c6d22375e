"""bench/bow_baseline.py's response cut (`--last-tokens`): what a left-truncated row keeps."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from rmkit.data.records import Record

_PATH = Path(__file__).resolve().parent.parent / "bench" / "bow_baseline.py"
_spec = importlib.util.spec_from_file_location("bow_baseline", _PATH)
bow = importlib.util.module_from_spec(_spec)
sys.modules["bow_baseline"] = bow
_spec.loader.exec_module(bow)


def test_last_tokens_keeps_each_responses_end_and_leaves_short_ones(tiny_tokenizer) -> None:
    long, short = " one two three four five six seven eight", " yes"
    rec = Record("User: count. Assistant:", (long, short), (1.0, 0.0), source="t", domain="business")
    ids = tiny_tokenizer(long, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 and len(tiny_tokenizer(short, add_special_tokens=False)["input_ids"]) <= 3
    (cut,) = bow.last_tokens([rec], tiny_tokenizer, 3)
    assert cut.responses == (tiny_tokenizer.decode(ids[-3:]), short)
    assert cut.responses[0].strip() and long.endswith(cut.responses[0].strip())
    assert (cut.prompt, cut.scores, cut.domain) == (rec.prompt, rec.scores, rec.domain)
