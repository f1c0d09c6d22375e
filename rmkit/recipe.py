"""Typed training recipes: load YAML, apply `--set` overrides, validate (every error at once),
derive what is derivable (gradient accumulation, precision), and dump the resolved copy.

Precision, batch sizes and the learning rate are decided here and nowhere else; the DeepSpeed
JSON files under `ds_configs/` hold only ZeRO settings and are filled in from the recipe.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rmkit.errors import RmkitError
from rmkit.resources import resource_dir

STAGES = ("blt", "grft", "crft")
# The packaged copies in a wheel install, the repository folders in a checkout (rmkit.resources).
RECIPES_DIR = resource_dir("recipes")
DS_CONFIGS_DIR = resource_dir("ds_configs")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSpec(_Strict):
    """LoRA through peft; the reward head is always trained and saved with the adapter."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class ModelSpec(_Strict):
    path: str = Field(..., description="model folder, built-in name (smollm2-135m), or parent checkpoint")
    pooling: Literal["last", "eos", "mean", "max"] = "last"
    lora: Optional[LoraSpec] = None
    trust_remote_code: bool = False
    head_seed: int = 0


class SourceSpec(_Strict):
    """One data file; `split` takes the train or test side of a prompt-hash split of it."""

    path: str
    format: Optional[Literal["dsp", "text-score", "chosen-rejected", "canonical"]] = None
    domain: Optional[str] = None
    listwise: bool = False
    weight: Optional[float] = Field(None, gt=0)
    split: Literal["all", "train", "test"] = "all"
    limit: Optional[int] = Field(None, gt=0)


class DataSpec(_Strict):
    train: list[SourceSpec] = Field(..., min_length=1)
    eval: dict[str, SourceSpec] = Field(default_factory=dict)
    mix_size: Optional[int] = Field(None, gt=0)
    allow_repeat: bool = False
    test_fraction: float = Field(0.1, gt=0, lt=1)
    split_salt: str = ""
    max_length: int = Field(512, gt=8)
    truncation_side: Literal["left", "right"] = "left"
    padding_side: Literal["left", "right"] = "right"
    # Prefix sharing: a record's responses share one row [prompt][resp_1][resp_2]... (prompt
    # computed once), chosen per micro-batch when it costs less; false = one row per response
    # (for models whose attention ignores a custom 4-D mask, e.g. some remote-code models).
    prefix_sharing: bool = True

    @model_validator(mode="before")
    @classmethod
    def _removed_template(cls, data: Any) -> Any:
        """`data.template` is gone (prompts are rendered by the readers, `REMOVED_KEYS`). Its only
        value ever accepted, "raw", is in every resolved recipe saved so far (run folders,
        checkpoints), so it is dropped and those still resume and evaluate; any other value
        stays, to be refused as a removed key."""
        if isinstance(data, dict) and data.get("template") == "raw":
            data = {k: v for k, v in data.items() if k != "template"}
        return data

    @model_validator(mode="after")
    def _weights_all_or_none(self) -> "DataSpec":
        given = [s.weight is not None for s in self.train]
        if any(given) and not all(given):
            raise ValueError("weights must be given for all train sources or for none")
        return self


class LossSpec(_Strict):
    ranking_weight: float = Field(1.0, ge=0)
    margin: float = 0.0
    imitation_weight: float = Field(0.0, ge=0)
    imitation_target: Literal["response", "whole"] = "response"
    # "token": mean NLL over every target token of a micro-batch, on a unique top response;
    # "sequence": the paper's (Linear95/DSP): each target's mean NLL, averaged over targets,
    # every response within 0.85 of the top score trained (so tied top responses all are).
    imitation_reduction: Literal["token", "sequence"] = "token"
    score_threshold: float = Field(0.0, ge=0)
    lm_chunk_size: int = Field(1024, gt=0)


class TrainSpec(_Strict):
    lr: float = Field(..., gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0)
    global_batch: int = Field(..., gt=0)
    micro_batch: int = Field(1, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    seed: int = 42
    eval_every: int = Field(0, ge=0)
    eval_on_start: bool = False
    save_every: int = Field(0, ge=0)
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Recompute decoder activations in backward: true = every layer (memory for ~1/3 more compute);
    # N = every N-th layer (layers 0, N, 2N, ...), about 1/N of both the memory saved and the cost.
    gradient_checkpointing: Union[bool, int] = False
    output_dir: str = "runs/run"

    @field_validator("gradient_checkpointing")
    @classmethod
    def _checkpoint_every(cls, v: Union[bool, int]) -> Union[bool, int]:
        if not isinstance(v, bool) and v < 1:
            raise ValueError("takes true, false, or N >= 1 to recompute every N-th decoder layer")
        return v

    def checkpoint_every(self) -> int:
        """Every how many decoder layers activations are recomputed; 0 = none."""
        g = self.gradient_checkpointing
        return (1 if g else 0) if isinstance(g, bool) else int(g)


class LaunchSpec(_Strict):
    deepspeed: str = "zero2"
    gpus: Union[int, Literal["auto"]] = "auto"
    nodes: int = Field(1, gt=0)
    hostfile: Optional[str] = None
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    master_port: Optional[int] = Field(None, gt=0, lt=65536)

    @field_validator("gpus")
    @classmethod
    def _positive(cls, v: Union[int, str]) -> Union[int, str]:
        if isinstance(v, int) and v <= 0:
            raise ValueError("gpus must be a positive integer or 'auto'")
        return v


class Recipe(_Strict):
    stage: Literal["blt", "grft", "crft"]
    domain: Optional[str] = None
    model: ModelSpec
    data: DataSpec
    loss: LossSpec = Field(default_factory=LossSpec)
    train: TrainSpec
    launch: LaunchSpec = Field(default_factory=LaunchSpec)

    @model_validator(mode="after")
    def _stage_rules(self) -> "Recipe":
        if self.stage == "crft" and not self.domain:
            raise ValueError("a crft recipe needs a domain (set `domain:` or pass --domain)")
        if self.stage == "blt" and self.loss.imitation_weight:
            raise ValueError("blt trains language modelling only; loss.imitation_weight applies to grft/crft")
        return self

    # ---- derived values: never typed by the user --------------------------------------------
    def world_size(self, gpus_available: int | None = None) -> int:
        gpus = self.launch.gpus if self.launch.gpus != "auto" else (gpus_available or 1)
        return int(gpus) * self.launch.nodes

    def grad_accum(self, world_size: int) -> int:
        per_step = self.train.micro_batch * world_size
        if self.train.global_batch % per_step:
            raise RmkitError(
                f"train.global_batch {self.train.global_batch} is not divisible by micro_batch x processes "
                f"= {self.train.micro_batch} x {world_size} = {per_step}",
                where="recipe",
                hint="pick a global batch that is a multiple of micro_batch x gpus x nodes; "
                     "gradient accumulation is derived from them",
            )
        return self.train.global_batch // per_step

    def precision(self, on_gpu: bool) -> tuple[str, str]:
        """(precision, why): launch.precision, or what `auto` picks for this machine."""
        from rmkit.hardware import resolve_precision

        return resolve_precision(self.launch.precision, on_gpu)


# ---- loading, overrides, validation --------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any) -> Any:
    """Expand `${NAME}` and `${NAME:-default}` in every string of a recipe tree."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            got = os.environ.get(m.group(1))
            if got is None:
                if m.group(2) is None:
                    raise RmkitError(f"environment variable {m.group(1)} is not set", where="recipe",
                                     hint=f"export {m.group(1)}=... or write ${{{m.group(1)}:-default}}")
                return m.group(2)
            return got
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


def parse_set(items: list[str] | None) -> list[tuple[str, Any]]:
    """`key.sub=value` pairs; the value is read as YAML (so 1e-6, true, [a, b] work)."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise RmkitError(f"--set {item!r} is not key=value", hint="example: --set train.lr=1e-5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 1e-6 as a string
        out.append((key.strip(), value))
    return out


def apply_overrides(tree: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted keys (list items by index: data.train.0.weight) in a plain dict tree."""
    for key, value in overrides:
        parts = key.split(".")
        node: Any = tree
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RmkitError(f"--set {key}: {'.'.join(parts[:i])} has no item {part}",
                                     hint=f"valid indexes are 0..{len(node) - 1}")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            else:
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
                    if not isinstance(node, (dict, list)):
                        raise RmkitError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section",
                                         hint=f"set the value itself: --set {'.'.join(parts[: i + 1])}=...")
    return tree


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class that owns the field at `path` (for 'did you mean' suggestions)."""
    cls: Any = Recipe
    for part in path:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        nxt = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            for sub in (cand, *getattr(cand, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    nxt = sub
        cls = nxt
    return cls


# Keys a recipe may no longer set: dotted path -> why, and what to do instead.
REMOVED_KEYS = {
    "data.template": "removed: prompts are rendered by the data readers, DSP queries and chat messages "
                     "as '## Human:' / '## Assistant:', text-score and chosen-rejected dialogues as they "
                     "are written; delete this line",
}


def _format_errors(err: ValidationError, where: str) -> RmkitError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top)"
        if e["type"] == "extra_forbidden" and dotted in REMOVED_KEYS:
            lines.append(f"  {dotted}: {REMOVED_KEYS[dotted]}")
        elif e["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1])
            names = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(loc[-1]), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            lines.append(f"  {dotted}: unknown key ({hint})")
        elif e["type"] == "missing":
            lines.append(f"  {dotted}: required field is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {dotted}: {msg} (got {e.get('input')!r})" if e["type"] != "value_error" else f"  {dotted}: {msg}")
    n = len(lines)
    return RmkitError(f"{n} problem{'s' if n > 1 else ''} in the recipe:\n" + "\n".join(lines), where=where,
                      hint="fix the fields above (`rmkit recipe show` prints the resolved recipe)")


def default_recipe_path(stage: str) -> Path:
    """The shipped recipe `rmkit train STAGE` uses without --recipe."""
    return RECIPES_DIR / f"{stage}.yaml"


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes, relative to the recipes folder (`grft.yaml`, `cpu/grft.yaml`)."""
    return sorted(p.relative_to(RECIPES_DIR).as_posix() for p in RECIPES_DIR.rglob("*.yaml")) if RECIPES_DIR.is_dir() else []


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """An existing file as given; else a shipped recipe named `cpu/grft`, `cpu/grft.yaml` or
    `recipes/cpu/grft.yaml`, so the names in the docs work from any folder and in a wheel install.

    A file in the current folder wins over a shipped recipe of the same name.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("recipes",) else path.parts
    if parts and not path.is_absolute() and ".." not in parts:
        name = Path(*parts)
        cand = RECIPES_DIR / (name if name.suffix in (".yaml", ".yml") else name.parent / f"{name.name}.yaml")
        if cand.is_file():
            return cand
    shipped = shipped_recipes()
    close = difflib.get_close_matches(str(name_or_path).removeprefix("recipes/").removesuffix(".yaml"),
                                      [s.removesuffix(".yaml") for s in shipped], n=1)
    raise RmkitError(f"no such recipe: {name_or_path}",
                     hint=(f"did you mean '{close[0]}'? " if close else "")
                     + "shipped recipes (by name from any folder, e.g. cpu/grft): "
                     + ", ".join(f"recipes/{s}" for s in shipped))


def load_tree(path: str | Path) -> dict[str, Any]:
    path = resolve_recipe_path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RmkitError(f"invalid YAML: {getattr(e, 'problem', e)}", where=where, hint="check indentation and colons") from None
    if not isinstance(tree, dict):
        raise RmkitError("a recipe must be a YAML mapping (stage:, model:, data:, ...)", where=str(path),
                         hint="start from a shipped recipe, e.g. recipes/grft.yaml")
    return tree


def load_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    stage: str | None = None,
    domain: str | None = None,
) -> Recipe:
    """Load, override, expand `${ENV}`, validate. `stage`/`domain` come from the CLI."""
    tree = load_tree(path)
    if stage is not None:
        if tree.get("stage") not in (None, stage):
            raise RmkitError(f"recipe is for stage '{tree.get('stage')}', but `rmkit train {stage}` was run",
                             where=str(path), hint=f"use a {stage} recipe, e.g. recipes/{stage}.yaml")
        tree["stage"] = stage
    if domain is not None:
        tree["domain"] = domain
    tree = apply_overrides(tree, parse_set(overrides))
    tree = expand_env(tree)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise _format_errors(e, str(path)) from None


def resolve_ds_config_path(name_or_path: str) -> Path:
    """A named ZeRO config (`zero2`) or a path; `ds_configs/NAME.json` that does not exist where
    run falls back to the shipped file, so recipes naming it work in a wheel install too."""
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if p.exists():
            return p
        shipped = DS_CONFIGS_DIR / p.name
        if p.parent == Path("ds_configs") and shipped.is_file():
            return shipped
        raise RmkitError(f"no such DeepSpeed config: {p}")
    cand = DS_CONFIGS_DIR / f"{name_or_path}.json"
    if not cand.exists():
        names = sorted(q.stem for q in DS_CONFIGS_DIR.glob("*.json"))
        close = difflib.get_close_matches(name_or_path, names, n=1)
        raise RmkitError(f"unknown DeepSpeed config '{name_or_path}'",
                         where="launch.deepspeed",
                         hint=(f"did you mean '{close[0]}'? " if close else "") + "named configs: " + ", ".join(names)
                         + " (or a path to a .json)")
    return cand


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
