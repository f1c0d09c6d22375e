"""Checking a model folder before any weights load: what it is, and how its texts become tokens.

Two kinds of folder are accepted, each read the way it was made:
- an rmkit checkpoint (meta.json, checked by `rmkit.checkpoint.read_meta`): prompt and response
  tokenized apart with the checkpoint's recorded max_length, truncation side, eos and padding;
- any Hugging Face sequence-classification folder with one label (safetensors): each whole text
  encoded as `tokenizer(text)` does (`rmkit.data.whole_text`).

Everything the user can get wrong about a folder is refused here with a clear message, so
`rmkit eval`, `rmkit score` and `rmkit serve` fail before loading anything. No torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmkit.checkpoint import META_FILE
from rmkit.data.sources import RECIPE_FILE
from rmkit.errors import RmkitError

LABEL_MAX = 20  # characters of a checkpoint label in tables ("crft-entertainment" is 18)
CKPT_HINT = ("give a folder written by `rmkit train` (RUN/final or RUN/checkpoints/step-N), or a "
             "Hugging Face reward folder (config.json, *.safetensors, tokenizer files)")


@dataclass
class Encoding:
    """How texts become token rows for one model.

    style "prompt+response": rmkit's `encode_record` (prompt and each response tokenized apart);
    style "whole-text": `tokenizer(prompt + response)`, exactly what the model's tokenizer does.
    """

    style: str
    max_length: int | None  # None: decided when the tokenizer is loaded (plain folders)
    truncation_side: str = "left"
    padding_side: str = "right"
    append_eos: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"style": self.style, "max_length": self.max_length, "truncation_side": self.truncation_side,
                "padding_side": self.padding_side, "append_eos": self.append_eos}


@dataclass
class Checkpoint:
    """A model folder, checked (no weights loaded yet)."""

    path: Path
    label: str
    kind: str  # "rmkit" or "hf"
    meta: dict[str, Any]  # rmkit: meta.json (file table dropped); hf: what config.json says
    encoding: Encoding
    recipe: Path | None  # the training recipe saved beside the weights (rmkit checkpoints)
    name: str = ""  # short label for tables (`short_labels`); `label` is the path as given


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a model folder; damage is a clear error, not a traceback."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RmkitError(f"unreadable {path.name}: {e}", where=str(path),
                         hint="the folder is damaged; re-save or re-download it") from None
    if not isinstance(value, dict):
        raise RmkitError(f"{path.name} is not a JSON object", where=str(path), hint=CKPT_HINT)
    return value


def tensor_names(folder: Path) -> set[str]:
    """Tensor names in the folder's safetensors headers (nothing is loaded); which head a plain
    folder has decides how it can be loaded (`rmkit.scorer`)."""
    names: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                names |= set(json.loads(fh.read(n))) - {"__metadata__"}
        except (OSError, struct.error, ValueError) as e:
            raise RmkitError(f"{f} is not a readable safetensors file: {e}",
                             hint="the folder is damaged; re-save or re-download it") from None
    return names


def _num_labels(config: dict[str, Any]) -> int:
    """What transformers will build: id2label wins, then num_labels, else its default of 2."""
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def inspect_checkpoint(path: str | Path, max_length: int | None = None) -> Checkpoint:
    """Classify and check a model folder: an rmkit checkpoint or a plain HF reward folder."""
    label = str(path)
    folder = Path(path).expanduser()
    if not folder.exists():
        raise RmkitError(f"no such checkpoint folder: {folder}", hint=CKPT_HINT)
    if not folder.is_dir():
        raise RmkitError(f"{folder} is a file, not a checkpoint folder", hint=CKPT_HINT)
    if max_length is not None and max_length < 2:
        raise RmkitError(f"--max-length must be at least 2, got {max_length}")

    if (folder / META_FILE).exists():
        from rmkit.checkpoint import read_meta

        meta = read_meta(folder)  # refuses a folder whose files do not match its meta.json
        meta.pop("files", None)
        if meta.get("kind") != "reward":
            raise RmkitError(
                f"{folder} is a {meta.get('stage', '?')} checkpoint of kind '{meta.get('kind')}': it has no "
                "trained reward head",
                hint="evaluate a grft or crft checkpoint; a blt checkpoint is a language model only")
        enc = meta.get("encoding")
        if not isinstance(enc, dict) or "max_length" not in enc:
            raise RmkitError(f"{folder}/meta.json records no encoding (max_length, truncation side)",
                             hint="it was written by an older rmkit; evaluate it as a plain folder by "
                                  "copying it without meta.json")
        encoding = Encoding("prompt+response", max_length or int(enc["max_length"]),
                            enc.get("truncation_side", "left"), enc.get("padding_side", "right"),
                            bool(enc.get("append_eos", False)))
        recipe = folder / RECIPE_FILE
        return Checkpoint(folder, label, "rmkit", meta, encoding, recipe if recipe.is_file() else None)

    if not (folder / "config.json").is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "(nothing)"
        raise RmkitError(f"{folder} has neither meta.json nor config.json: not a model folder",
                         hint=f"{CKPT_HINT}. It holds: {present}")
    if not any(folder.glob("*.safetensors")):
        bins = sorted(p.name for p in folder.glob("*.bin"))
        raise RmkitError(f"{folder} has no safetensors weights" + (f" (it has {', '.join(bins)})" if bins else ""),
                         hint="rmkit loads safetensors only: re-save the model with "
                              "`model.save_pretrained(folder, safe_serialization=True)`")
    config = read_json_object(folder / "config.json")
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise RmkitError(
            f"{folder} is not a sequence-classification reward model (architectures: {', '.join(archs) or 'none'})",
            hint="a reward folder is an <Arch>ForSequenceClassification with num_labels 1; make one with "
                 "`rmkit train grft`")
    labels = _num_labels(config)
    if labels != 1:
        raise RmkitError(f"{folder} is a classifier with {labels} labels, not a reward model",
                         hint="a reward model has num_labels 1 (one scalar score per text)")
    pooling = config.get("rmkit_pooling")
    if pooling in ("mean", "max"):
        raise RmkitError(f"{folder} was trained with {pooling} pooling, which AutoModelForSequenceClassification "
                         "does not reproduce", hint="evaluate the rmkit checkpoint folder it came from (with meta.json)")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        raise RmkitError(f"{folder} has no tokenizer files", hint="save the tokenizer beside the model "
                         "(`tokenizer.save_pretrained(folder)`)")
    pad = config.get("pad_token_id", (config.get("text_config") or {}).get("pad_token_id"))
    meta = {"architectures": archs, "model_type": config.get("model_type"), "num_labels": 1,
            "rmkit_pooling": pooling, "pad_token_id": pad if isinstance(pad, int) else None}
    # Right padding: every architecture then scores a padded row exactly as the lone text.
    encoding = Encoding("whole-text", max_length, "left", "right", False)
    return Checkpoint(folder, label, "hf", meta, encoding, None)


# ---- short labels for tables --------------------------------------------------------------------

def _base_label(ckpt: Checkpoint) -> str:
    """stage[-domain] from an rmkit checkpoint's meta.json; a plain folder's name (a run's
    `final` or `step-N` keeps its run folder's name in front)."""
    if ckpt.kind == "rmkit":
        stage, domain = ckpt.meta.get("stage") or "rmkit", ckpt.meta.get("domain")
        return f"{stage}-{domain}" if domain else str(stage)
    folder = ckpt.path.resolve()
    if folder.name == "final" or folder.name.startswith("step-"):
        return f"{folder.parent.name}/{folder.name}"
    return folder.name or str(folder)


def _clip(label: str) -> str:
    return label if len(label) <= LABEL_MAX else label[:LABEL_MAX - 1] + "…"


def short_labels(checkpoints: list[Checkpoint]) -> list[str]:
    """One short, unique label per checkpoint for narrow tables (the legend maps it to the path):
    `grft`, `crft-business`, a plain folder's name; checkpoints with one label and different
    steps become `grft@100`, `grft@200`; any other clash is numbered `grft#1`, `grft#2`."""
    bases = [_clip(_base_label(c)) for c in checkpoints]
    out = []
    for k, (ckpt, base) in enumerate(zip(checkpoints, bases)):
        twins = [c for c, b in zip(checkpoints, bases) if b == base]
        steps = [c.meta.get("step") for c in twins]
        if len(twins) == 1:
            out.append(base)
        elif None not in steps and len(set(steps)) == len(steps):
            out.append(f"{base}@{ckpt.meta['step']}")
        else:
            out.append(f"{base}#{bases[:k + 1].count(base)}")
    while len(set(out)) < len(out):  # e.g. a folder literally named `grft#1`
        out = [f"{x}#{k + 1}" if out.count(x) > 1 else x for k, x in enumerate(out)]
    return out
