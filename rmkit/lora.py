"""LoRA on the reward model's decoder (through peft), adapter checkpoints, and base fingerprints.

With `model.lora` set, peft injects LoRA layers into `RewardModel.base_model` (the decoder);
every base weight is frozen, including the LM head (so the imitation loss trains the adapter
only), and the reward head `score` is always trained. An adapter checkpoint holds only what
training changed:

ADAPTER_CKPT/
  adapter_model.safetensors  LoRA A/B of every target module + the reward head, under peft's key
                             names for `<Arch>ForSequenceClassification`, e.g.
                             base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight,
                             base_model.model.score.weight
  adapter_config.json        peft's LoraConfig (task_type SEQ_CLS, modules_to_save [score]), so
                             `PeftModel.from_pretrained(AutoModelForSequenceClassification(base), CKPT)`
                             loads it too
  tokenizer files, rmkit_recipe.yaml
  meta.json                  kind "adapter", base {path, fingerprint}, lora {...} (written last)

The base fingerprint is sha256 over the base's config.json (canonical JSON) and, for every
*.safetensors file in the folder: its name, size, header, and the first and last 4 KiB of every
tensor's bytes. Any training of a weight changes its bytes nearly everywhere, so sampling each
tensor catches a different checkpoint of the same architecture (headers alone would not), while
a 7B folder costs a few MB of reads instead of hashing 14 GB.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmkit.errors import RmkitError
from rmkit.io import atomic_file, atomic_write_json

if TYPE_CHECKING:
    import torch

    from rmkit.model import RewardModel
    from rmkit.recipe import LoraSpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"  # peft's name for the one adapter; dropped from saved keys, as peft does
HEAD_KEY = "score.weight"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped HF model
SAMPLE_BYTES = 4096  # fingerprint: bytes read from each end of every tensor


# ---- training ---------------------------------------------------------------------------------
def is_trainable(name: str) -> bool:
    """Whether a RewardModel parameter name is trained under LoRA: adapter weights and the head."""
    return ".lora_" in name or name == HEAD_KEY


def apply_lora(model: "RewardModel", spec: "LoraSpec", seed: int) -> None:
    """Inject LoRA into the decoder in place; freeze everything except LoRA weights and `score`.

    The LoRA A matrices are initialized from `seed` alone (not the rank's seed), so every rank
    builds identical weights before DeepSpeed partitions them.
    """
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model.base_model, adapter_name=ADAPTER_NAME)
        except ValueError as e:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.base_model.named_modules()
                             if isinstance(m, torch.nn.Linear)})
            raise RmkitError(f"LoRA could not be applied: {e}", where="model.lora.target_modules",
                             hint="name modules of this model, e.g. one of: " + ", ".join(linear)) from None
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name))
    _detach_frozen_weight(model.lm_head)


def _detach_frozen_weight(linear: "torch.nn.Module") -> None:
    """Make a frozen Linear pass `weight.detach()` to F.linear (same values, no grad either way).

    Why: the imitation loss runs lm_head inside a non-reentrant activation checkpoint. torch saves
    a tensor that needs no grad *by reference*, so for a frozen lm_head it keeps the Parameter
    itself; ZeRO-3 empties that Parameter (.data = []) right after the recomputed forward, and
    backward then fails ("Recomputed values ... different metadata": [vocab, hidden] vs [0]).
    A detached alias is a separate tensor that keeps the gathered values until backward used them,
    exactly as happens for a trainable weight.
    """
    import types

    import torch
    import torch.nn.functional as F

    if type(linear) is not torch.nn.Linear or linear.weight.requires_grad:
        return

    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.detach()
        return F.linear(x, self.weight.detach(), bias)

    linear.forward = types.MethodType(forward, linear)


def count_parameters(model: "torch.nn.Module") -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 partitions report their full size)."""
    trainable = total = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# ---- key names ----------------------------------------------------------------------------------
def to_peft_key(name: str, base_prefix: str) -> str:
    """RewardModel key -> peft file key: base_model.layers.0.q_proj.lora_A.default.weight ->
    base_model.model.<prefix>.layers.0.q_proj.lora_A.weight; score.weight -> base_model.model.score.weight."""
    if name == HEAD_KEY:
        return PEFT_PREFIX + HEAD_KEY
    if not name.startswith("base_model."):
        raise ValueError(f"not an adapter key: {name}")
    inner = name[len("base_model."):].replace(f".{ADAPTER_NAME}.", ".")
    inner = inner.removesuffix(f".{ADAPTER_NAME}")  # lora_embedding_A.default (a ParameterDict)
    return f"{PEFT_PREFIX}{base_prefix}.{inner}"


def from_peft_key(key: str, base_prefix: str) -> str:
    """The inverse of `to_peft_key`."""
    if key == PEFT_PREFIX + HEAD_KEY:
        return HEAD_KEY
    head = f"{PEFT_PREFIX}{base_prefix}."
    if not key.startswith(head):
        raise ValueError(f"adapter key {key} is not under {head}")
    parts = key[len(head):].split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_"):
            parts.insert(i + 1, ADAPTER_NAME)
            break
    return "base_model." + ".".join(parts)


# ---- adapter checkpoints ------------------------------------------------------------------------
def adapter_config(spec: "LoraSpec", base_path: Path) -> dict[str, Any]:
    """peft's adapter_config.json for a sequence-classification model with the head saved."""
    from peft import LoraConfig

    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=sorted(spec.target_modules), bias="none", task_type="SEQ_CLS",
                     modules_to_save=["score"], base_model_name_or_path=str(base_path), inference_mode=True)
    out = cfg.to_dict()
    for k, v in out.items():
        if isinstance(v, set):
            out[k] = sorted(v)
    out["modules_to_save"] = ["score"]  # peft appends its defaults (classifier, score) for SEQ_CLS
    return json.loads(json.dumps(out))  # enums -> plain strings


def write_adapter(folder: Path, tensors: dict[str, "torch.Tensor"], spec: "LoraSpec", base_path: Path,
                  base_prefix: str, tokenizer: Any = None) -> None:
    """Write adapter weights (RewardModel keys -> peft keys), adapter_config.json and the tokenizer."""
    from safetensors.torch import save

    extra = sorted(k for k in tensors if not is_trainable(k))
    if extra or HEAD_KEY not in tensors:
        raise ValueError(f"adapter tensors must be LoRA weights + {HEAD_KEY}; extra={extra[:5]}")
    data = save({to_peft_key(k, base_prefix): v.detach().to("cpu").contiguous().clone()
                 for k, v in tensors.items()}, metadata={"format": "pt"})
    with atomic_file(folder / ADAPTER_WEIGHTS, "wb") as f:
        f.write(data)
    atomic_write_json(folder / ADAPTER_CONFIG, adapter_config(spec, base_path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def read_adapter(folder: Path, base_prefix: str) -> tuple[dict[str, Any], dict[str, "torch.Tensor"]]:
    """(adapter_config.json, tensors under RewardModel keys)."""
    from safetensors.torch import load_file

    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    tensors = {from_peft_key(k, base_prefix): v for k, v in load_file(str(folder / ADAPTER_WEIGHTS)).items()}
    return config, tensors


def lora_spec_from_config(config: dict[str, Any]) -> "LoraSpec":
    from rmkit.recipe import LoraSpec

    return LoraSpec(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                    target_modules=list(config["target_modules"]))


def load_adapter_weights(model: "RewardModel", tensors: dict[str, "torch.Tensor"], where: Path) -> None:
    """Copy adapter + head tensors into a LoRA-injected model; the key sets must match exactly."""
    import torch

    params = dict(model.named_parameters())
    expected = {n for n in params if is_trainable(n)}
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise RmkitError(f"{where / ADAPTER_WEIGHTS} does not fit the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}",
                         hint="the adapter was trained on another architecture or target_modules")
    with torch.no_grad():
        for name in expected:
            params[name].copy_(tensors[name].to(params[name].dtype))


def merge_lora(model: "torch.nn.Module") -> int:
    """Fold every LoRA layer into its base weight (peft's merge) and put the plain layer back.
    Returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name in names:
        layer = model.get_submodule(name)
        layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return len(names)


# ---- fingerprints -------------------------------------------------------------------------------
def base_fingerprint(folder: Path) -> str:
    """sha256 of a model folder's config and sampled safetensors bytes (see the module docstring)."""
    folder = Path(folder)
    h = hashlib.sha256()
    config = folder / "config.json"
    if not config.is_file():
        raise RmkitError(f"{folder} has no config.json", hint="the base must be a model folder")
    h.update(b"config.json\0" + json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RmkitError(f"{folder} has no *.safetensors weights", hint="the base must be a model folder")
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            raw = fh.read(n)
            header = json.loads(raw)
            h.update(f"\0{f.name}\0{size}\0".encode() + raw)
            start_of_data = 8 + n
            for name in sorted(k for k in header if k != "__metadata__"):
                begin, end = header[name]["data_offsets"]
                spans = [(begin, end)] if end - begin <= 2 * SAMPLE_BYTES else \
                    [(begin, begin + SAMPLE_BYTES), (end - SAMPLE_BYTES, end)]
                for a, b in spans:
                    fh.seek(start_of_data + a)
                    h.update(fh.read(b - a))
    return h.hexdigest()


def adapter_fingerprint(folder: Path, base_fp: str) -> str:
    """sha256 of the adapter's weights and config (all bytes: they are small) and its base."""
    h = hashlib.sha256(base_fp.encode())
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update(f"\0{name}\0".encode())
        with open(folder / name, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def adapter_meta(spec: "LoraSpec", base_path: Path, base_fp: str, trainable: int, total: int) -> dict[str, Any]:
    """The meta.json fields that make a checkpoint an adapter checkpoint."""
    return {"kind": "adapter", "base": {"path": str(base_path), "fingerprint": base_fp},
            "lora": spec.model_dump(mode="json"),
            "parameters": {"trainable": trainable, "total": total}}
