"""Where the shipped recipes and named ZeRO configs live, in a wheel install and in a checkout.

The repository keeps `recipes/` and `ds_configs/` at its top, where users read and edit them. A
wheel has no repository, so the build (setup.py's build_py) copies both folders into the package
as `rmkit/_resources/`. An editable install or a plain checkout has no such copy and uses the
repository folders directly, so an edit there takes effect without reinstalling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

ResourceKind = Literal["recipes", "ds_configs"]

_PACKAGE = Path(__file__).resolve().parent
PACKAGED_DIR = _PACKAGE / "_resources"  # filled by the wheel build only; never committed
REPO_ROOT = _PACKAGE.parent


def resource_dir(kind: ResourceKind) -> Path:
    """The folder of shipped `kind` files: the packaged copy when present, else the repository's."""
    packaged = PACKAGED_DIR / kind
    return packaged if packaged.is_dir() else REPO_ROOT / kind
