"""rmkit: customized reward models (BLT -> GRFT -> CRFT) on DeepSpeed.

Importing this package must stay cheap: no torch, transformers or deepspeed here, so that
`rmkit --help` is instant. Heavy imports live inside the functions that need them; `rmkit.load`
imports them when it is called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path_or_url: Any, **kwargs: Any) -> Any:
    """A reward function over a checkpoint folder or a running `rmkit serve` (see `rmkit.api.load`)."""
    from rmkit.api import load as _load

    return _load(path_or_url, **kwargs)
