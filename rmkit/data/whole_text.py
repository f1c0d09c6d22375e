"""Whole-text encoding: each response as `tokenizer(prompt + response)` encodes it.

This is how a plain Hugging Face reward folder reads text (no rmkit meta.json says otherwise),
so a reward equals `model(**tokenizer(text)).logits`. rmkit's own checkpoints tokenize prompt
and response apart instead (`rmkit.data.collate.encode_record`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rmkit.data.records import Record

if TYPE_CHECKING:
    from rmkit.data.collate import EncodedRecord


def _whole_ids(tokenizer: Any, text: str, max_length: int, side: str) -> tuple[list[int], bool]:
    """`tokenizer(text)` ids; an over-long text loses body tokens from `side` and keeps the special
    tokens the tokenizer puts around it (BOS, CLS/SEP), so the model still sees its frame."""
    full = list(tokenizer(text)["input_ids"])
    if len(full) <= max_length:
        return full, False
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for start in range(0, min(8, len(full) - len(plain)) + 1):
        if full[start:start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain):]
            keep = max_length - len(prefix) - len(suffix)
            if keep > 0:
                body = plain[len(plain) - keep:] if side == "left" else plain[:keep]
                return prefix + body + suffix, True
            break
    return (full[len(full) - max_length:] if side == "left" else full[:max_length]), True


def encode_whole_text(record: Record, tokenizer: Any, max_length: int, side: str = "left",
                      strip_id: int | None = None) -> "EncodedRecord":
    """Each response as `tokenizer(prompt + response)` encodes it. The rows' common token prefix is
    stored as the record's prompt ids, so prompt_ids + response_ids[i] is exactly row i and a
    scorer that shares the prompt can share it too (every row keeps at least one own token).

    strip_id: trailing tokens equal to it are dropped. HF's sequence classifiers pool at the last
    token that is not the pad id; under causal attention the tokens after it change nothing, so
    the shorter row scores exactly what `model(**tokenizer(text))` scores."""
    from rmkit.data.collate import EncodedRecord

    rows, truncated = [], False
    for response in record.responses:
        ids, cut = _whole_ids(tokenizer, record.prompt + response, max_length, side)
        if strip_id is not None:
            while len(ids) > 1 and ids[-1] == strip_id:
                ids.pop()
        rows.append(ids)
        truncated |= cut
    k = 0
    limit = min(len(r) for r in rows) - 1
    while k < limit and all(r[k] == rows[0][k] for r in rows):
        k += 1
    return EncodedRecord(rows[0][:k], [r[k:] for r in rows], tuple(float(s) for s in record.scores), truncated)
