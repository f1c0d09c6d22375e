"""Readers: any supported preference file -> canonical `Record`s, with every drop counted.

Four row formats (`dsp`, `text-score`, `chosen-rejected`, `canonical`) in four containers (JSON
array, JSONL, parquet, a `datasets.save_to_disk` folder). The format is detected from the keys
of the first rows. Nothing is dropped silently: each skipped pair or group adds one to a named
reason in `ConvertResult.dropped`, and a file that yields no record at all is an error.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rmkit.data.records import Record, parse_jsonl, strict_pairs
from rmkit.errors import RmkitError

FORMATS = ("dsp", "text-score", "chosen-rejected", "canonical")

# Keys that identify each row format (detection scores the share of these present).
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "dsp": ("query", "responses"),
    "text-score": ("text", "score"),
    "chosen-rejected": ("chosen", "rejected"),
    "canonical": ("prompt", "responses", "scores"),
}

# The paper's dialogue template; DSP prompts and rendered chat messages use it.
MD_HUMAN = "## Human:\n"
MD_ASSISTANT = "## Assistant:\n"
# Anthropic HH template: "\n\nHuman: ...\n\nAssistant: ...".
HH_ASSISTANT = "\n\nAssistant:"

# Drop reasons (the keys of ConvertResult.dropped), named once so tests and docs agree.
EMPTY = "empty text"
IDENTICAL = "identical texts"
IDENTICAL_LISTWISE = "identical to preferred (response removed)"
TIES = "ties only"
MISMATCH = "prompt mismatch"
NO_TAG = "no assistant turn"
# Not a drop: rows whose texts' own last assistant tags disagree because a response contains a
# further "Assistant:" turn; the split falls back to the last tag of the shared prefix.
SHARED_PREFIX = "split at shared prefix (response contains an assistant tag)"

ROW_HINT = "records count from 0 in a JSON array or dataset, lines from 1 in JSONL"


@dataclass
class ConvertResult:
    """What a read produced: the records, how many input rows, and why anything was left out."""

    records: list[Record]
    read: int
    dropped: Counter[str] = field(default_factory=Counter)
    format: str = ""
    notes: Counter[str] = field(default_factory=Counter)  # kept-but-noteworthy rows, e.g. SHARED_PREFIX

    @property
    def pairs(self) -> int:
        return sum(len(r.pairs()) for r in self.records)


# --------------------------------------------------------------------------- containers


@dataclass
class _Rows:
    """Rows of a file, each with the `where` string errors should name."""

    items: list[tuple[str, Any]]
    name: str


def _read_json_array(path: Path, text: str) -> _Rows:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RmkitError(f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno}, character {e.pos})",
                         where=str(path), hint="the file starts with '[' so it is read as one JSON array; "
                                               "fix the syntax at that position") from None
    if not isinstance(data, list):
        raise RmkitError(f"expected a JSON array of records, got {type(data).__name__}", where=str(path))
    return _Rows([(f"{path}: record {i}", row) for i, row in enumerate(data)], str(path))


def _read_jsonl(path: Path, text: str) -> _Rows:
    return _Rows([(f"{path}:{lineno}", row) for lineno, row in parse_jsonl(io.StringIO(text), path)], str(path))


def _read_with_datasets(path: Path) -> _Rows:
    """Parquet files and `save_to_disk` folders, read locally by the `datasets` library."""
    import datasets  # heavy: imported only when such a file is read

    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise RmkitError(f"not a saved datasets folder: {e}", where=str(path),
                             hint="pass a folder written by `Dataset.save_to_disk`, or a .json/.jsonl/.parquet file") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds.keys())
            if len(splits) != 1:
                raise RmkitError(f"a DatasetDict with splits {', '.join(splits)}; rmkit reads one split at a time",
                                 where=str(path), hint=f"pass the split's folder, e.g. {path / splits[0]}")
            ds = ds[splits[0]]
    else:
        try:
            ds = datasets.Dataset.from_parquet(str(path))
        except Exception as e:  # pyarrow raises several types for a bad file
            raise RmkitError(f"cannot read parquet: {e}", where=str(path),
                             hint="check that the file is a complete parquet file") from None
    return _Rows([(f"{path}: record {i}", row) for i, row in enumerate(ds)], str(path))


def read_rows(path: str | os.PathLike[str]) -> _Rows:
    """Read a file's rows without interpreting them; the container is chosen by content/suffix."""
    path = Path(path)
    if not path.exists():
        raise RmkitError(f"no such file or folder: {path}",
                         hint="check the path (relative paths are resolved from the current folder)")
    if path.is_dir() or path.suffix == ".parquet":
        rows = _read_with_datasets(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RmkitError(f"not UTF-8 text ({e.reason} at byte {e.start})", where=str(path),
                             hint="rmkit reads JSON/JSONL as UTF-8; parquet files need the .parquet suffix") from None
        stripped = text.lstrip()
        rows = _read_json_array(path, text) if stripped.startswith("[") else _read_jsonl(path, text)
    if not rows.items:
        raise RmkitError("the file holds no records", where=str(path),
                         hint="the file is empty; check how it was produced")
    return rows


# --------------------------------------------------------------------------- detection


def detect_format(rows: _Rows, probe: int = 5) -> str:
    """Pick the format whose identifying keys best match the first rows' keys."""
    keys: set[str] = set()
    for where, row in rows.items[:probe]:
        if not isinstance(row, dict):
            raise RmkitError(f"expected a JSON object, got {type(row).__name__}", where=where,
                             hint="each record must be an object with named fields")
        keys |= set(row)
    scored = {fmt: sum(k in keys for k in sig) / len(sig) for fmt, sig in _SIGNATURES.items()}
    best = max(scored.values())
    winners = [f for f, s in scored.items() if s == best]
    if best == 0 or len(winners) > 1:
        raise RmkitError(f"cannot tell the format from the fields {', '.join(sorted(keys)) or '(none)'}",
                         where=rows.name,
                         hint="known formats: " + "; ".join(f"{f} ({', '.join(sig)})" for f, sig in _SIGNATURES.items())
                              + ". Pass --format to choose one")
    return winners[0]


# --------------------------------------------------------------------------- field access


def _field(row: Any, name: str, where: str, kind: type | tuple[type, ...], what: str) -> Any:
    """Fetch a required field with a type check; errors name the record and the field."""
    if not isinstance(row, dict):
        raise RmkitError(f"expected a JSON object, got {type(row).__name__}", where=where)
    if name not in row:
        raise RmkitError(f"missing field '{name}'", where=where, hint=f"every record needs '{name}' ({what}); {ROW_HINT}")
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RmkitError(f"field '{name}' must be {what}, got {type(value).__name__}", where=where, hint=ROW_HINT)
    return value


def _strings(value: list[Any], name: str, where: str) -> list[str]:
    if not all(isinstance(v, str) for v in value):
        raise RmkitError(f"field '{name}' must hold only strings", where=where, hint=ROW_HINT)
    return value


def _numbers(value: list[Any], name: str, where: str) -> list[float]:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise RmkitError(f"field '{name}' must hold only numbers", where=where, hint=ROW_HINT)
    return [float(v) for v in value]


def check_group(responses: list[str], scores: list[float]) -> str | None:
    """The drop reason for a candidate record, or None to keep it.

    Empty responses carry nothing to rank; identical texts with different scores contradict
    each other; a group whose scores are all equal carries no preference.
    """
    if any(not r.strip() for r in responses):
        return EMPTY
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if responses[i] == responses[j] and scores[i] != scores[j]:
                return IDENTICAL
    if not strict_pairs(scores):
        return TIES
    return None


# --------------------------------------------------------------------------- dsp


def dsp_prompt(query: str) -> str:
    """A DSP query as a one-turn chat prompt (`chat_prompt`); the response follows directly."""
    return chat_prompt([("user", query)])


def _dsp_domains(rows: _Rows) -> list[str]:
    for _, row in rows.items[:5]:
        if isinstance(row, dict) and isinstance(row.get("responses"), dict):
            return [k for k in row["responses"] if k != "normal"]
    return []


def _read_dsp(rows: _Rows, domain: str | None, listwise: bool, out: ConvertResult) -> None:
    found = _dsp_domains(rows)
    if domain is None or domain not in found:
        problem = "DSP data needs --domain" if domain is None else f"unknown domain '{domain}'"
        raise RmkitError(f"{problem}; domains in this file: {', '.join(found)}", where=rows.name,
                         hint=f"pass --domain with one of: {', '.join(found)} (its response is preferred over the others)")
    for where, row in rows.items:
        query = _field(row, "query", where, str, "a string")
        responses = _field(row, "responses", where, dict, "an object of domain -> response")
        for key, text in responses.items():
            if not isinstance(text, str):
                raise RmkitError(f"field 'responses.{key}' must be a string, got {type(text).__name__}", where=where)
        if domain not in responses:
            raise RmkitError(f"field 'responses' lacks domain '{domain}'", where=where,
                             hint=f"every DSP record needs a response for each domain; {ROW_HINT}")
        prompt = dsp_prompt(query)
        best = responses[domain]
        others = [k for k in responses if k != domain]
        if listwise:
            # Responses equal to the preferred one are removed (counted per response); the
            # group itself drops when a text is empty or nothing is left to rank against.
            kept = [k for k in others if responses[k] != best]
            texts = [best] + [responses[k] for k in kept]
            scores = [1.0] + [0.0] * len(kept)
            reason = IDENTICAL if not kept else check_group(texts, scores)
            if reason:
                out.dropped[reason] += 1
                continue
            if len(kept) < len(others):
                out.dropped[IDENTICAL_LISTWISE] += len(others) - len(kept)
            out.records.append(Record(prompt, tuple(texts), tuple(scores), "dsp", domain, {"keys": [domain] + kept}))
        else:
            for k in others:
                texts, scores = [best, responses[k]], [1.0, 0.0]
                reason = check_group(texts, scores)
                if reason:
                    out.dropped[reason] += 1
                    continue
                out.records.append(Record(prompt, tuple(texts), tuple(scores), "dsp", domain, {"rejected": k}))


# --------------------------------------------------------------------------- text-score


def _assistant_tag(text: str) -> str | None:
    """Which template's assistant tag a dialogue uses (the paper's `## Assistant:` first)."""
    if MD_ASSISTANT in text:
        return MD_ASSISTANT
    if HH_ASSISTANT in text:
        return HH_ASSISTANT
    return None


def split_dialogues(texts: list[str]) -> tuple[str, list[str], bool] | str:
    """Split whole dialogues that share a history into (prompt, responses, used_shared_prefix).

    The prompt runs up to and including the last assistant tag; the response is the rest, its
    leading space or newline kept. Some HH responses contain a further "Assistant:" turn of their
    own, so the split point is the last tag inside the texts' common prefix: identical to the
    last tag of each text when responses are clean, and correct when they are not. Returns a
    drop reason string when the texts have no assistant turn or no shared history.
    """
    tags = {_assistant_tag(t) for t in texts}
    if None in tags or len(tags) != 1:
        return NO_TAG if None in tags else MISMATCH
    tag = tags.pop()
    assert tag is not None
    common = os.path.commonprefix(texts)
    k = common.rfind(tag)
    if k < 0:
        return MISMATCH
    prompt = common[: k + len(tag)]
    own_last = {t[: t.rfind(tag) + len(tag)] for t in texts}
    return prompt, [t[len(prompt):] for t in texts], own_last != {prompt}


def _read_text_score(rows: _Rows, domain: str | None, out: ConvertResult, source: str) -> None:
    for where, row in rows.items:
        texts = _strings(_field(row, "text", where, list, "a list of strings"), "text", where)
        scores = _numbers(_field(row, "score", where, list, "a list of numbers"), "score", where)
        if len(texts) != len(scores):
            raise RmkitError(f"{len(texts)} texts but {len(scores)} scores", where=where,
                             hint="give exactly one score per text")
        if len(texts) < 2:
            raise RmkitError(f"a record needs at least 2 texts, got {len(texts)}", where=where, hint=ROW_HINT)
        _add_dialogues(texts, scores, domain, source, out)


def _add_dialogues(texts: list[str], scores: list[float], domain: str | None, source: str, out: ConvertResult) -> None:
    split = split_dialogues(texts)
    if isinstance(split, str):
        out.dropped[split] += 1
        return
    prompt, responses, shared = split
    reason = check_group(responses, scores)
    if reason:
        out.dropped[reason] += 1
        return
    if shared:
        out.notes[SHARED_PREFIX] += 1
    out.records.append(Record(prompt, tuple(responses), tuple(scores), source, domain))


# --------------------------------------------------------------------------- chosen-rejected

_ROLE_TAGS = {"user": MD_HUMAN, "human": MD_HUMAN, "assistant": MD_ASSISTANT, "system": "## System:\n"}


def _messages(value: Any, name: str, where: str) -> list[tuple[str, str]]:
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in value):
        raise RmkitError(f"field '{name}' must be a string or a list of {{role, content}} messages", where=where,
                         hint=ROW_HINT)
    msgs = [(m["role"].lower(), m["content"]) for m in value]
    for role, _ in msgs:
        if role not in _ROLE_TAGS:
            raise RmkitError(f"field '{name}' has a message with unknown role '{role}'", where=where,
                             hint="roles must be user, assistant or system")
    return msgs


def render_messages(msgs: list[tuple[str, str]]) -> str:
    """Chat messages in the paper's `## Human:` / `## Assistant:` template, turns joined by a blank line."""
    return "\n\n".join(_ROLE_TAGS[role] + content for role, content in msgs)


def chat_prompt(msgs: list[tuple[str, str]]) -> str:
    """A rendered history ending with the assistant tag, so the response follows directly: the
    one prompt template of the data layer (DSP queries, chat-message prompts, merge's probes)."""
    return (render_messages(msgs) + "\n\n" if msgs else "") + MD_ASSISTANT


def _response_text(msgs: list[tuple[str, str]], where: str, name: str) -> str:
    """A completion: the first assistant message's content, then any further turns rendered."""
    if not msgs:
        return ""
    if msgs[0][0] != "assistant":
        raise RmkitError(f"field '{name}' must continue with an assistant message, got '{msgs[0][0]}'", where=where,
                         hint="the completion after the prompt starts with the assistant's reply")
    rest = render_messages(msgs[1:])
    return msgs[0][1] + ("\n\n" + rest if rest else "")


def _read_chosen_rejected(rows: _Rows, domain: str | None, out: ConvertResult, source: str) -> None:
    for where, row in rows.items:
        if not isinstance(row, dict):
            raise RmkitError(f"expected a JSON object, got {type(row).__name__}", where=where)
        chosen = _field(row, "chosen", where, (str, list), "a string or a list of messages")
        rejected = _field(row, "rejected", where, (str, list), "a string or a list of messages")
        if type(chosen) is not type(rejected):
            raise RmkitError("fields 'chosen' and 'rejected' must both be strings or both message lists", where=where)
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise RmkitError(f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}",
                             where=where)
        if isinstance(chosen, str):
            if prompt is None:  # implicit prompt: whole dialogues, split like text-score
                _add_dialogues([chosen, rejected], [1.0, 0.0], domain, source, out)
                continue
            if not isinstance(prompt, str):
                raise RmkitError("field 'prompt' is a message list but 'chosen' is a string", where=where,
                                 hint="use strings for all three fields or message lists for all three")
            texts, prompt_text = [chosen, rejected], prompt
        else:
            c, r = _messages(chosen, "chosen", where), _messages(rejected, "rejected", where)
            if prompt is None:  # implicit prompt: the shared history up to the last assistant turn
                n = 0
                while n < min(len(c), len(r)) and c[n] == r[n]:
                    n += 1
                while n > 0 and not (n < len(c) and c[n][0] == "assistant"):
                    n -= 1  # back off so both completions start with an assistant reply
                hist, c, r = c[:n], c[n:], r[n:]
                if c == r:
                    out.dropped[IDENTICAL] += 1
                    continue
                if not (c and r and c[0][0] == r[0][0] == "assistant"):
                    out.dropped[MISMATCH] += 1  # no shared history ending before an assistant reply
                    continue
            else:
                if isinstance(prompt, str):
                    raise RmkitError("field 'prompt' is a string but 'chosen' is a message list", where=where,
                                     hint="use strings for all three fields or message lists for all three")
                hist = _messages(prompt, "prompt", where)
            prompt_text = chat_prompt(hist)
            texts = [_response_text(c, where, "chosen"), _response_text(r, where, "rejected")]
        reason = check_group(texts, [1.0, 0.0])
        if reason:
            out.dropped[reason] += 1
            continue
        out.records.append(Record(prompt_text, tuple(texts), (1.0, 0.0), source, domain))


# --------------------------------------------------------------------------- canonical


def _read_canonical(rows: _Rows, domain: str | None, out: ConvertResult, source: str) -> None:
    for where, row in rows.items:
        rec = Record.from_json(row, where=where)
        reason = check_group(list(rec.responses), list(rec.scores))
        if reason:
            out.dropped[reason] += 1
            continue
        if (domain is not None and rec.domain is None) or not rec.source:
            rec = Record(rec.prompt, rec.responses, rec.scores, rec.source or source,
                         rec.domain if rec.domain is not None else domain, rec.meta)
        out.records.append(rec)


# --------------------------------------------------------------------------- entry point

_READERS: dict[str, Callable[..., None]] = {
    "text-score": _read_text_score,
    "chosen-rejected": _read_chosen_rejected,
    "canonical": _read_canonical,
}


def load_source(path: str | os.PathLike[str], format: str | None = None, domain: str | None = None,
                listwise: bool = False) -> ConvertResult:
    """Read one file or folder of preference data into canonical records.

    `domain` chooses the preferred DSP response (required for `dsp`); for other formats it tags
    records that carry no domain. `listwise` keeps a DSP query's responses as one ranked group.
    """
    if format is not None and format not in FORMATS:
        raise RmkitError(f"unknown format '{format}'", hint=f"formats: {', '.join(FORMATS)} (or leave --format out to detect it)")
    rows = read_rows(path)
    fmt = format or detect_format(rows)
    if listwise and fmt != "dsp":
        raise RmkitError(f"--listwise applies to DSP data only; this file is {fmt}",
                         hint="text-score groups of more than two are already kept whole")
    out = ConvertResult(records=[], read=len(rows.items), format=fmt)
    source = Path(path).name if Path(path).is_dir() else Path(path).stem
    if fmt == "dsp":
        _read_dsp(rows, domain, listwise, out)
    else:
        _READERS[fmt](rows, domain, out, source)
    if not out.records:
        reasons = ", ".join(f"{n} {r}" for r, n in out.dropped.most_common())
        if set(out.dropped) == {TIES}:
            raise RmkitError(f"every record is a tie ({out.dropped[TIES]} of {out.read}); nothing to learn from",
                             where=rows.name, hint="ties carry no preference; check the scores in this file")
        raise RmkitError(f"no records left after dropping {reasons}", where=rows.name,
                         hint="every row was dropped; check the file's contents")
    return out
