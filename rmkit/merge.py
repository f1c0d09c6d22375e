"""Fold a LoRA adapter checkpoint into its base: a full reward folder that needs no peft.

OUT/
  model.safetensors (or shards), config.json, tokenizer files  -> AutoModelForSequenceClassification
  lm_head.safetensors   only for a base with an untied LM head (so imitation can continue)
  rmkit_recipe.yaml     the recipe the adapter was trained with
  meta.json             stage, domain, step, pooling, encoding, dtype, parent, and merged_from
                        {adapter, adapter_fingerprint, base, base_fingerprint, lora}; written last
                        with the file table, like every rmkit checkpoint

The folder is built under a temporary name and finished like every rmkit checkpoint
(`checkpoint.finalize`: meta.json with the file table written last, then an atomic rename), only
after the self-check: a few fixed pairs are scored by base + adapter (unmerged, through peft's
layers) and by the written folder reloaded from disk; the largest reward difference is
reported and, in fp32, must stay within float tolerance. Merging the same adapter into the same OUT again does nothing.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmkit import __version__
from rmkit.checkpoint import META_FILE, finalize, is_complete, read_meta
from rmkit.data.readers import chat_prompt
from rmkit.data.records import Record
from rmkit.errors import RmkitError
from rmkit.io import staging_dir, write_error
from rmkit.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_fingerprint,
    apply_lora,
    base_fingerprint,
    load_adapter_weights,
    lora_spec_from_config,
    merge_lora,
    read_adapter,
)

DTYPES = ("fp32", "bf16")
# fp32: merging only re-associates (W + s*B@A) x vs W x + s*B (A x); bf16 adds weight rounding.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # x max(1, largest |reward|)
FP_SHOWN = 16  # fingerprint characters shown in messages

# The self-check's pairs, rendered as the data layer renders a user turn (readers.chat_prompt),
# so the probe prompts look like what the adapter was trained on.
PROBES = [Record(chat_prompt([("user", question)]), (good, bad), (1.0, 0.0)) for question, good, bad in (
    ("how do I bake bread?", "Mix flour, water, salt and yeast; knead, rise, bake.", "I don't know."),
    ("write one line about the sea.", "Grey waves fold the light into the shore.", "The sea is water."),
    ("what should a quarterly report open with?", "The bottom line: revenue, margin and the one decision needed.",
     "A long story."),
    ("cite a source for the boiling point of water.",
     "At sea level water boils at 100 C (CRC Handbook of Chemistry and Physics).", "Trust me."),
)]


@dataclass
class MergeResult:
    out: Path
    skipped: bool  # OUT already held this merge
    adapter_fingerprint: str
    base: Path | None = None
    layers: int = 0
    max_diff: float = 0.0
    tolerance: float = 0.0
    pairs: int = 0
    loader: str = ""
    seconds: float = 0.0


def read_adapter_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of a complete adapter checkpoint, or a clear error saying what ckpt is instead."""
    if not ckpt.is_dir():
        raise RmkitError(f"no such checkpoint folder: {ckpt}", hint="pass RUN/final or RUN/checkpoints/step-N")
    if not (ckpt / META_FILE).is_file() and (ckpt / "final").is_dir():
        raise RmkitError(f"{ckpt} is a run folder, not a checkpoint", hint=f"merge {ckpt / 'final'}")
    meta = read_meta(ckpt)
    if meta.get("kind") != "adapter":
        raise RmkitError(f"{ckpt} is not a LoRA adapter checkpoint (meta.json kind {meta.get('kind')!r})",
                         hint="it is already a full model folder: load or evaluate it directly")
    for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (ckpt / f).is_file():
            raise RmkitError(f"{ckpt} has no {f}", hint="the adapter checkpoint is damaged")
    return meta


def check_base(meta: dict[str, Any], ckpt: Path, base: Path | None) -> tuple[Path, str]:
    """The base folder (recorded, or --base) and its fingerprint, which must match the recorded one."""
    recorded = Path(meta["base"]["path"])
    expected = meta["base"]["fingerprint"]
    path = base if base is not None else recorded
    if not path.is_dir():
        raise RmkitError(f"base {path} does not exist", where="--base" if base is not None else str(ckpt / META_FILE),
                         hint="the base moved? pass its new location with --base PATH")
    found = base_fingerprint(path)
    if found != expected:
        raise RmkitError(
            f"base {path} does not match the adapter {ckpt}: expected base fingerprint "
            f"{expected[:FP_SHOWN]} (recorded for {recorded}), found {found[:FP_SHOWN]}",
            hint="pass --base with the folder the adapter was trained on; a base changed after training "
                 "cannot be used")
    return path, found


def already_merged(out: Path, adapter_fp: str, dtype: str) -> bool:
    """True when OUT holds exactly this merge; refuses to replace a folder merge did not write."""
    if not out.exists():
        return False
    meta = json.loads((out / META_FILE).read_text()) if is_complete(out) else None
    if meta is None or "merged_from" not in meta:
        raise RmkitError(f"{out} exists and is not a folder written by `rmkit merge`",
                         hint="choose another -o, or delete it")
    return meta["merged_from"].get("adapter_fingerprint") == adapter_fp and meta.get("dtype") == dtype


def _probe_batch(tokenizer: Any, encoding: dict[str, Any]) -> Any:
    from rmkit.data.collate import collate, encode_record

    enc = [encode_record(r, tokenizer, encoding.get("max_length", 512), encoding.get("truncation_side", "left"),
                         encoding.get("append_eos", False)) for r in PROBES]
    return collate(enc, pad_id=tokenizer.pad_token_id, padding_side="right")  # right: HF's positions agree


def merge(ckpt: Path, out: Path, base: Path | None = None, dtype: str = "fp32") -> MergeResult:
    """Merge adapter checkpoint `ckpt` into its base and write the full reward folder `out`."""
    started = time.monotonic()
    if dtype not in DTYPES:
        raise RmkitError(f"unknown dtype {dtype!r}", where="--dtype", hint=f"choose one of {', '.join(DTYPES)}")
    ckpt, out = Path(ckpt), Path(out)
    meta = read_adapter_meta(ckpt)
    afp = adapter_fingerprint(ckpt, meta["base"]["fingerprint"])
    if out.resolve() in (ckpt.resolve(), *([base.resolve()] if base else []), Path(meta["base"]["path"]).resolve()):
        raise RmkitError(f"-o {out} is the adapter or its base", hint="write the merged model to a new folder")
    if already_merged(out, afp, dtype):
        return MergeResult(out, True, afp)
    base_path, bfp = check_base(meta, ckpt, base)

    import torch
    from transformers.utils import logging as hf_logging

    from rmkit.model import RewardModel
    from rmkit.tokenizer import load_tokenizer

    hf_logging.disable_progress_bar()  # our own lines say what happens; no per-load bars
    model = RewardModel.from_pretrained(base_path, pooling=meta.get("pooling"), dtype=torch.float32)
    base_prefix = model.base_prefix
    try:
        config, tensors = read_adapter(ckpt, base_prefix)
    except ValueError as e:
        raise RmkitError(f"{ckpt / ADAPTER_WEIGHTS}: {e}", hint="was it trained on another architecture?") from None
    apply_lora(model, lora_spec_from_config(config), seed=0)
    load_adapter_weights(model, tensors, ckpt)
    model.eval()
    tokenizer = load_tokenizer(ckpt)
    batch = _probe_batch(tokenizer, meta.get("encoding", {}))
    with torch.no_grad():
        before = model(batch.input_ids, batch.attention_mask, batch.position_ids).rewards
        layers = merge_lora(model)
    target = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    scale = max(1.0, float(before.abs().max()))
    with staging_dir(out) as tmp:
        model.save_pretrained(tmp, kind="reward", tokenizer=tokenizer, state_dict=state)
        del model, state
        if (ckpt / "rmkit_recipe.yaml").is_file():
            shutil.copyfile(ckpt / "rmkit_recipe.yaml", tmp / "rmkit_recipe.yaml")
        after, loader = _score_written(tmp, batch, meta.get("pooling", "last"), tokenizer.pad_token_id)
        diff = float((after - before).abs().max())
        tol = TOLERANCE[dtype] * scale
        if not diff <= tol:
            raise RmkitError(f"merged rewards differ from base + adapter by {diff:.3g} (tolerance {tol:.3g}); "
                             f"nothing was written to {out}", hint="report this with the adapter's meta.json")
        lineage = {k: meta.get(k) for k in ("stage", "domain", "step", "total_steps", "parent", "pooling",
                                           "encoding", "recipe_sha256", "data_manifest_sha256", "git_commit")}
        lineage.update({
            "kind": "reward", "base_model": str(base_path.resolve()), "dtype": dtype, "rmkit_version": __version__,
            "merged_from": {"adapter": str(ckpt.resolve()), "adapter_fingerprint": afp,
                            "base": str(base_path.resolve()), "base_fingerprint": bfp, "lora": meta.get("lora")},
            "merge_check": {"pairs": len(PROBES), "max_abs_diff": diff, "tolerance": tol, "loader": loader},
        })
        try:
            finalize(tmp, out, lineage)  # meta.json with the file table last, then the rename
        except OSError as e:
            raise write_error(out, e) from None
    return MergeResult(out, False, afp, base_path, layers, diff, tol, len(PROBES), loader,
                       time.monotonic() - started)


def _score_written(folder: Path, batch: Any, pooling: str, pad_id: int) -> tuple[Any, str]:
    """Rewards of the folder as written. Pooling last/eos: through AutoModelForSequenceClassification
    (what users load; it reads the last non-pad token). mean/max, or a pad id inside the text (pad ==
    eos): through RewardModel, since HF's head cannot pool that way."""
    import torch

    attended_pad = bool(((batch.input_ids == pad_id) & batch.attention_mask.bool()).any())
    with torch.no_grad():
        if pooling in ("last", "eos") and not attended_pad:
            from transformers import AutoModelForSequenceClassification

            hf = AutoModelForSequenceClassification.from_pretrained(
                str(folder), dtype=torch.float32, local_files_only=True, use_safetensors=True).eval()
            return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0].float(), \
                "AutoModelForSequenceClassification"
        from rmkit.model import RewardModel

        ours = RewardModel.from_pretrained(folder, dtype=torch.float32).eval()
        return ours(batch.input_ids, batch.attention_mask, batch.position_ids).rewards, "RewardModel"
