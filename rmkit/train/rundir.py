"""Build a run directory from a validated recipe: the only thing the worker reads.

RUN/
  recipe.yaml        the resolved recipe (overrides applied, ${ENV} expanded)
  ds_config.json     the DeepSpeed config: ZeRO settings from ds_configs/ + batch, lr, precision
  data/train.jsonl   the training records (converted, split, sliced, mixed) in canonical form
  data/eval-NAME.jsonl
  data/manifest.json every source: path, sha256, format, records read/kept/dropped by reason
  run.json           stage, domain, parent checkpoint, world size, model path, hashes
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmkit import __version__
from rmkit.allocator import allocator_choice
from rmkit.checkpoint import META_FILE
from rmkit.data.records import write_records
from rmkit.data.sources import load_eval_sets, load_spec
from rmkit.errors import RmkitError
from rmkit.inspection import tensor_names
from rmkit.io import atomic_write_json, atomic_write_text, sha256_file, sha256_text
from rmkit.recipe import Recipe, dump_recipe, resolve_ds_config_path


@dataclass
class RunPlan:
    run_dir: Path
    world_size: int
    grad_accum: int
    precision: str
    model_path: Path
    parent_meta: dict[str, Any] | None
    precision_reason: str = ""


def output_dir(recipe: Recipe) -> Path:
    return Path(recipe.train.output_dir.replace("{domain}", recipe.domain or "none"))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def read_parent_meta(model_path: Path) -> dict[str, Any] | None:
    meta = model_path / META_FILE
    if not meta.exists():
        return None
    from rmkit.checkpoint import read_meta

    try:  # an interrupted or altered checkpoint (files missing or resized) is refused here
        return read_meta(model_path)
    except RmkitError as e:
        e.where = "model.path"
        raise


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def external_parent(model_path: Path) -> dict[str, Any]:
    """Any Hugging Face sequence-classification reward folder (TRL's or OpenRLHF's output, a released
    RM) as the GRFT stage a CRFT run continues: recorded in the lineage as an external GRFT stage
    with its path and fingerprint. Anything that is not a reward model is refused, saying what it is
    (pickled weights were refused before, by `resolve_model`: rmkit loads safetensors only)."""
    from rmkit.lora import base_fingerprint

    hint = ("train one first with `rmkit train grft` and set model.path to its final/ folder, or give a Hugging "
            "Face reward folder: <Arch>ForSequenceClassification, num_labels 1, safetensors")
    where = "model.path"
    head = f"CRFT must start from a GRFT checkpoint, but {model_path} is no rmkit meta.json"
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise RmkitError(f"{head} and no model folder (no config.json)", where=where, hint=hint)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RmkitError(f"{model_path}/config.json is unreadable: {e}", where=where, hint=hint) from None
    archs = [str(a) for a in (config.get("architectures") or [])]
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        what = ("a causal language model" if any(a.endswith(CAUSAL_SUFFIXES) for a in archs) or not archs
                else "not a sequence-classification model")
        raise RmkitError(f"{head} and {what} ({', '.join(archs) or 'no architectures in config.json'}), not a reward "
                         "model", where=where, hint=hint)
    labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else int(config.get("num_labels", 2))
    if labels != 1:
        raise RmkitError(f"{model_path} is a classifier with {labels} labels, not a reward model", where=where,
                         hint="a reward model has num_labels 1 (one scalar score per text)")
    keys = tensor_names(model_path)
    if "score.weight" not in keys:
        raise RmkitError(f"{model_path} has no `score` head ({archs[0]}): rmkit continues decoder reward models "
                         "(Llama, Qwen, Mistral, Gemma, ...)", where=where, hint=hint)
    if "score.bias" in keys:
        raise RmkitError(f"{model_path} has a score head with a bias; rmkit's head has none", where=where,
                         hint="continue from a reward model with a bias-free score head (what TRL and OpenRLHF save)")
    return {"stage": "grft", "external": True, "path": str(model_path.resolve()),
            "fingerprint": base_fingerprint(model_path), "architectures": archs,
            "model_type": config.get("model_type")}


def check_parent(recipe: Recipe, model_path: Path) -> dict[str, Any] | None:
    """CRFT must continue from a GRFT checkpoint; the chain is read from the parent's meta.json.
    A folder without one continues as an external GRFT stage when it is a reward model."""
    meta = read_parent_meta(model_path) if model_path.is_dir() else None
    if recipe.stage == "crft":
        if meta is None and model_path.is_dir():
            return external_parent(model_path)
        if meta is None or meta.get("stage") != "grft":
            found = "no rmkit meta.json" if meta is None else f"a '{meta.get('stage')}' checkpoint"
            raise RmkitError(
                f"CRFT must start from a GRFT checkpoint, but {model_path} is {found}",
                where="model.path",
                hint="train one first with `rmkit train grft` and set model.path to its final/ folder "
                     "(e.g. --set model.path=runs/grft/final)",
            )
    return meta


def prepare_data(recipe: Recipe, data_dir: Path) -> dict[str, Any]:
    """Convert, split, slice and mix every source; write canonical files and the manifest."""
    from rmkit.data.mix import mix_records

    loaded = [(f"data.train.{i}", *load_spec(s, recipe, f"data.train.{i}")) for i, s in enumerate(recipe.data.train)]
    sources = [(name, recs, recipe.data.train[i].weight) for i, (name, recs, _) in enumerate(loaded)]
    if len(sources) == 1 and sources[0][2] is None and recipe.data.mix_size is None:
        train, counts = sources[0][1], {sources[0][0]: len(sources[0][1])}
    else:
        train, counts = mix_records(sources, recipe.data.mix_size, recipe.train.seed, recipe.data.allow_repeat)
    write_records(data_dir / "train.jsonl", train)
    manifest: dict[str, Any] = {"train": [], "eval": {}, "train_records": len(train),
                                "train_pairs": sum(len(r.pairs()) for r in train)}
    for (name, _, info) in loaded:
        info["taken"] = counts.get(name, 0)
        manifest["train"].append(info)
    for name, (recs, info) in load_eval_sets(recipe).items():
        write_records(data_dir / f"eval-{name}.jsonl", recs)
        manifest["eval"][name] = info
    for f in sorted(data_dir.glob("*.jsonl")):
        manifest.setdefault("files", {})[f.name] = sha256_file(f)
    atomic_write_json(data_dir / "manifest.json", manifest)
    return manifest


def fill_ds_config(recipe: Recipe, world_size: int, precision: str, on_gpu: bool) -> dict[str, Any]:
    """ZeRO settings from the named file; everything else from the recipe (one place)."""
    path = resolve_ds_config_path(recipe.launch.deepspeed)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RmkitError(f"invalid JSON: {e.msg}", where=f"{path}:{e.lineno}") from None
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "optimizer", "scheduler", "bf16", "fp16"):
        if key in cfg:
            raise RmkitError(f"'{key}' must not be set in a DeepSpeed config file", where=str(path),
                             hint="batch sizes, optimizer, lr and precision come from the recipe; keep only ZeRO settings there")
    t = recipe.train
    offload = bool(cfg.get("zero_optimization", {}).get("offload_optimizer"))
    opt_params: dict[str, Any] = {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay}
    if not on_gpu and not offload:
        # no fused CUDA Adam on CPU (offload uses DeepSpeedCPUAdam): torch's AdamW, in its fused CPU
        # kernel, several times faster than its per-tensor loop (bench/adamw_step.py)
        opt_params.update(torch_adam=True, fused=True)
    cfg.update({
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": recipe.grad_accum(world_size),
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": opt_params},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    })
    return cfg


def detect_gpus() -> int:
    """Visible accelerators without importing torch where possible."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([v for v in vis.split(",") if v.strip() != ""])
    import torch

    return torch.cuda.device_count()


def plan_run(recipe: Recipe) -> RunPlan:
    """Everything that can be checked before touching the run directory."""
    from rmkit.models import resolve_model

    gpus = detect_gpus()
    on_gpu = gpus > 0
    world = recipe.world_size(gpus if on_gpu else 1)
    if recipe.launch.gpus != "auto" and on_gpu and int(recipe.launch.gpus) > gpus:
        raise RmkitError(f"launch.gpus={recipe.launch.gpus} but only {gpus} GPU(s) are visible", where="recipe")
    accum = recipe.grad_accum(world)
    precision, why = recipe.precision(on_gpu)
    if not on_gpu:
        allocator_choice()  # a bad RMKIT_MALLOC fails here, not in every rank
    if precision == "fp16" and not on_gpu:
        raise RmkitError("fp16 needs a GPU", where="launch.precision", hint="use fp32 (or bf16) on CPU")
    if recipe.stage == "crft" and not Path(recipe.model.path).exists():
        raise RmkitError(f"CRFT starts from a GRFT checkpoint, but {recipe.model.path} does not exist",
                         where="model.path",
                         hint="train one first, e.g. `rmkit train grft --recipe recipes/cpu/grft.yaml`, "
                              "or point --set model.path=... at an existing GRFT final/ folder")
    model_path = resolve_model(recipe.model.path)
    parent = check_parent(recipe, model_path)
    resolve_ds_config_path(recipe.launch.deepspeed)
    return RunPlan(output_dir(recipe), world, accum, precision, model_path, parent, why)


def _parent_entry(plan: RunPlan) -> dict[str, Any] | None:
    """The lineage entry of the parent: an rmkit checkpoint's stage, domain and step, or an external
    reward folder's path, fingerprint and architecture (as the GRFT stage it stands for)."""
    meta = plan.parent_meta
    if not meta:
        return None
    if meta.get("external"):
        return {k: meta[k] for k in ("path", "stage", "external", "fingerprint", "architectures", "model_type")}
    return {"path": str(plan.model_path.resolve()), "stage": meta.get("stage"), "domain": meta.get("domain"),
            "step": meta.get("step")}


def write_run_dir(recipe: Recipe, plan: RunPlan) -> dict[str, Any]:
    """Write recipe, ds_config, data and run.json into the run directory."""
    run = plan.run_dir
    run.mkdir(parents=True, exist_ok=True)
    manifest = prepare_data(recipe, run / "data")
    ds_cfg = fill_ds_config(recipe, plan.world_size, plan.precision, on_gpu=detect_gpus() > 0)
    recipe_text = dump_recipe(recipe)
    atomic_write_text(run / "recipe.yaml", recipe_text)
    atomic_write_json(run / "ds_config.json", ds_cfg)
    info = {
        "stage": recipe.stage, "domain": recipe.domain, "model_path": str(plan.model_path.resolve()),
        "parent": _parent_entry(plan),
        "world_size": plan.world_size, "grad_accum": plan.grad_accum, "precision": plan.precision,
        "precision_reason": plan.precision_reason,
        "recipe_sha256": sha256_text(recipe_text),
        "data_manifest_sha256": sha256_file(run / "data" / "manifest.json"),
        "rmkit_version": __version__, "git_commit": git_commit(),
    }
    atomic_write_json(run / "run.json", info)
    return manifest
