"""Loading a tokenizer the one way rmkit does everywhere (train, eval, merge, serve).

Many decoder tokenizers ship without a pad token; rmkit pads with EOS then. The padded positions
are masked out of attention and pooling, so which id pads never changes a reward, but every place
that encodes must agree on it, so the rule lives here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def with_pad_token(tokenizer: Any) -> Any:
    """`tokenizer` with a pad token: its own, else its EOS token."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in `path` (local files only: nothing is downloaded), padded as above."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    return with_pad_token(tok)
