"""`rmkit eval`: preference accuracy of reward models on eval sets, and plain reward scoring.

Two kinds of model folder are accepted, and each is read the way it was made:
- an rmkit checkpoint (meta.json): `RewardModel` with the checkpoint's recorded encoding
  (prompt and response tokenized apart, max_length, truncation side, appended eos, padding side);
- any Hugging Face sequence-classification folder with one label (safetensors): each whole text
  encoded as `tokenizer(text)` does, so a reward equals `model(**tokenizer(text)).logits`.
  A decoder folder whose head is a bias-free `score` (Llama, Qwen, Mistral, Gemma, GPT-2, ...,
  what TRL and OpenRLHF save) loads into `RewardModel` and shares each record's common token
  prefix, like rmkit checkpoints; any other (encoders, biased heads) runs as
  `AutoModelForSequenceClassification`, right-padded, one row per text.

Everything the user can get wrong (folders, recipe, data files) is checked before any model is
loaded, and the JSON report is written atomically at the very end: a bad input leaves no file.
Scoring goes through `rmkit.score.score_shard` (the scorer training uses): no gradients, batches
grouped by length, one device->host transfer per set, records sharing a prompt scored together
with each distinct text once; bf16 on GPU, and on CPU what `launch.precision: auto` picks.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rmkit import __version__
from rmkit.data.records import Record, iter_jsonl
from rmkit.errors import RmkitError
from rmkit.io import atomic_write_json, atomic_write_jsonl
from rmkit.stats import DEFAULT_RESAMPLES, DEFAULT_SEED

if TYPE_CHECKING:
    import torch

    from rmkit.data.collate import EncodedRecord
    from rmkit.score import SetResult

RECIPE_FILE = "rmkit_recipe.yaml"
DEFAULT_BATCH_SIZE = 16  # records per forward on a GPU; every response of a record rides in the same batch
FALLBACK_MAX_LENGTH = 2048  # plain folders whose config and tokenizer name no length limit
PROGRESS_MIN_RECORDS = 64  # sets shorter than this finish before a bar is worth drawing
LABEL_MAX = 20  # characters of a checkpoint label in tables ("crft-entertainment" is 18)
MIN_RESAMPLES = 100
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


@dataclass
class EvalSet:
    """Records to evaluate on, and where they came from (path, sha256, split, drops)."""

    name: str
    records: list[Record]
    source: dict[str, Any]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps([r.prompt, list(r.responses), list(r.scores)], ensure_ascii=False).encode())
        return h.hexdigest()


@dataclass
class Scorer:
    """A loaded model, its tokenizer, and how it turns records into token rows."""

    checkpoint: Checkpoint
    model: Any  # forward(input_ids, attention_mask, position_ids) -> object with .rewards [N]
    tokenizer: Any
    pad_id: int
    device: "torch.device"
    dtype: "torch.dtype"
    encoding: Encoding = field(init=False)
    strip_id: int | None = None  # HF pools at the last token that is not the config's pad id

    def __post_init__(self) -> None:
        self.encoding = self.checkpoint.encoding

    def encode(self, record: Record) -> "EncodedRecord":
        e = self.encoding
        assert e.max_length is not None
        if e.style == "prompt+response":
            from rmkit.data.collate import encode_record

            return encode_record(record, self.tokenizer, e.max_length, e.truncation_side, e.append_eos)
        return encode_whole_text(record, self.tokenizer, e.max_length, e.truncation_side, self.strip_id)


# ---- checking folders (no torch) -------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RmkitError(f"unreadable {path.name}: {e}", where=str(path),
                         hint="the folder is damaged; re-save or re-download it") from None
    if not isinstance(value, dict):
        raise RmkitError(f"{path.name} is not a JSON object", where=str(path), hint=CKPT_HINT)
    return value


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

    if (folder / "meta.json").exists():
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
    config = _read_json(folder / "config.json")
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


# ---- eval sets --------------------------------------------------------------------------------

def parse_data_arg(arg: str) -> tuple[Path, str]:
    """PATH[:NAME] -> (path, name); NAME defaults to the file stem. A path that exists as written
    is taken whole, so a ':' inside a file name still works."""
    if Path(arg).exists() or ":" not in arg:
        path, name = Path(arg), ""
    else:
        head, name = arg.rsplit(":", 1)
        path = Path(head)
    name = name or (path.name if path.is_dir() else path.stem)
    if not name:
        raise RmkitError(f"--data {arg!r} names no set", hint="write --data PATH or --data PATH:NAME")
    return path, name


def load_data_args(args: list[str], domain: str | None) -> list[EvalSet]:
    """Read every --data file (any format `load_source` reads); a bad file fails before scoring."""
    from rmkit.data.readers import load_source
    from rmkit.io import sha256_file

    sets: list[EvalSet] = []
    for arg in args:
        path, name = parse_data_arg(arg)
        if any(s.name == name for s in sets):
            raise RmkitError(f"two --data sets are named '{name}'", where=f"--data {arg}",
                             hint="name them apart with PATH:NAME")
        if not path.exists():
            raise RmkitError(f"no such data file: {path}", where=f"--data {arg}",
                             hint="paths are relative to the current folder")
        try:
            res = load_source(path, domain=domain)
        except RmkitError as e:
            if e.where is None:
                e.where = f"--data {path}"
            raise
        source = {"path": str(path), "sha256": sha256_file(path) if path.is_file() else None,
                  "format": res.format, "domain": domain, "split": "all", "limit": None,
                  "rows_read": res.read, "dropped": dict(res.dropped)}
        sets.append(EvalSet(name, res.records, source))
    return sets


def load_recipe_sets(ckpt: Checkpoint) -> list[EvalSet]:
    """The checkpoint's own `data.eval` sets, resolved exactly as training resolved them."""
    from rmkit.recipe import load_recipe
    from rmkit.train.rundir import load_eval_sets

    if ckpt.recipe is None:
        what = "a plain model folder with no training recipe" if ckpt.kind == "hf" else f"missing {RECIPE_FILE}"
        raise RmkitError(f"{ckpt.label} has no eval sets of its own ({what})",
                         hint="pass the data: --data PATH[:NAME] (repeatable; DSP files also need --domain)")
    recipe = load_recipe(ckpt.recipe)
    if not recipe.data.eval:
        raise RmkitError(f"the recipe saved in {ckpt.label} has no data.eval sets",
                         hint="pass the data: --data PATH[:NAME] (repeatable)")
    try:
        loaded = load_eval_sets(recipe)
    except RmkitError as e:
        e.where = f"{ckpt.recipe}: {e.where}" if e.where else str(ckpt.recipe)
        e.hint = (e.hint + "; " if e.hint else "") + "or pass the data with --data PATH[:NAME]"
        raise
    return [EvalSet(name, recs, {k: v for k, v in info.items() if k != "weight"})
            for name, (recs, info) in loaded.items()]


def gather_sets(checkpoints: list[Checkpoint], data: list[str], domain: str | None) -> list[EvalSet]:
    """--data sets, or the union of the recipe sets of the checkpoints that have a recipe (same
    name, other records -> the later one is renamed NAME@CHECKPOINT, never silently merged);
    every checkpoint is scored on every set."""
    if data:
        return load_data_args(data, domain)
    if domain is not None:
        raise RmkitError("--domain applies to --data files only",
                         hint="the recipe's eval sets carry their own domain; to score DSP data for another "
                              "domain pass --data PATH:NAME --domain D")
    sets: list[EvalSet] = []
    seen: dict[str, str] = {}
    with_recipe = [c for c in checkpoints if c.recipe is not None] or checkpoints[:1]
    for ckpt in with_recipe:
        for s in load_recipe_sets(ckpt):
            fp = s.fingerprint()
            if seen.get(s.name) == fp:
                continue
            if s.name in seen:
                s.name = f"{s.name}@{ckpt.label}"
            seen[s.name] = fp
            sets.append(s)
    return sets


# ---- encoding for plain folders -----------------------------------------------------------------

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


# ---- loading models ----------------------------------------------------------------------------

class _HFReward:
    """Wraps an AutoModelForSequenceClassification so `score_shard` reads `.rewards` from it.

    Position ids are left to the model (right padding makes them those of the lone text). It
    reads one row per response: a packed (prefix-shared) batch is refused, never misread.
    """

    supports_packing = False

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor",
                 position_ids: "torch.Tensor | None" = None, segment_ids: "torch.Tensor | None" = None,
                 **_: Any) -> Any:
        from rmkit.model import RewardOutput

        if segment_ids is not None:
            raise ValueError("a plain Hugging Face reward model scores one row per response; "
                             "score_shard must not pack its batches")
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return RewardOutput(logits.squeeze(-1).float(), None, 0)


def default_batch_size(device: "torch.device") -> int:
    """Records per forward when --batch-size is not given: 16 on a GPU, where one text leaves the
    device idle; 1 on a CPU, where one text already keeps the cores multiplying, time follows the
    token positions computed, and every padded position is a wasted one (bench/eval_throughput.py
    on 64 HH pairs, 2 cores: with the shared prefix, batches of 16 compute 0.99x the per-text
    loop's positions, batches of 1 0.84x; docs/benchmarks.md)."""
    return DEFAULT_BATCH_SIZE if device.type == "cuda" else 1


def default_device() -> tuple["torch.device", "torch.dtype"]:
    """The first GPU in bf16 when there is one, else the CPU in the precision training's
    `launch.precision: auto` picks there (bf16 with AMX, fp32 without: `rmkit.hardware`)."""
    import torch

    from rmkit.hardware import resolve_precision

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    precision, _ = resolve_precision("auto", on_gpu=False)
    return torch.device("cpu"), torch.bfloat16 if precision == "bf16" else torch.float32


def load_scorer(ckpt: Checkpoint, device: "torch.device | None" = None, dtype: "torch.dtype | None" = None,
                trust_remote_code: bool = False) -> Scorer:
    """Load weights and tokenizer onto the device, in eval mode; a folder that passed the checks
    but still fails to load (damaged weights, unknown architecture) is a clear error too."""
    try:
        return _load_scorer(ckpt, device, dtype, trust_remote_code)
    except RmkitError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise RmkitError(f"could not load {ckpt.label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         hint="check that the folder loads with transformers; re-save or re-download it") from None


def _load_scorer(ckpt: Checkpoint, device: "torch.device | None", dtype: "torch.dtype | None",
                 trust_remote_code: bool) -> Scorer:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if device is None or dtype is None:
        d, t = default_device()
        device, dtype = device or d, dtype or t
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # load reports and over-length warnings: we count truncation ourselves
    hf_logging.disable_progress_bar()  # our own bar is the progress display
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
        if ckpt.kind == "rmkit":
            from rmkit.model import RewardModel

            if tokenizer.pad_token_id is None:  # as training does
                tokenizer.pad_token = tokenizer.eos_token
            model = RewardModel.from_pretrained(ckpt.path, pooling=ckpt.meta.get("pooling"), dtype=dtype,
                                                trust_remote_code=trust_remote_code)
            model.to(device).eval()
            return Scorer(ckpt, model, tokenizer, int(tokenizer.pad_token_id), device, dtype)

        config_pad = ckpt.meta["pad_token_id"]  # HF's pooling skips it
        shared = _load_decoder_reward(ckpt, dtype, trust_remote_code)
        if shared is None:
            from transformers import AutoModelForSequenceClassification

            hf = AutoModelForSequenceClassification.from_pretrained(
                str(ckpt.path), dtype=dtype, local_files_only=True, use_safetensors=True,
                trust_remote_code=trust_remote_code)
    finally:
        hf_logging.set_verbosity(verbosity)
    if ckpt.encoding.max_length is None:
        text = (shared.config if shared is not None else hf.config).get_text_config()
        limits = [int(v) for v in (getattr(text, "max_position_embeddings", None), getattr(text, "n_positions", None),
                                   tokenizer.model_max_length) if isinstance(v, int) and 1 < v < 1_000_000]
        ckpt.encoding.max_length = min(limits) if limits else FALLBACK_MAX_LENGTH
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = int(config_pad if config_pad is not None else (pad if pad is not None else 0))
    if shared is not None:
        shared.to(device).eval()
        return Scorer(ckpt, shared, tokenizer, pad, device, dtype, strip_id=config_pad)
    hf.to(device).eval()
    text = hf.config.get_text_config()
    if getattr(text, "pad_token_id", None) is None:
        # HF pools at the last token that is not padding; batching needs some pad id.
        text.pad_token_id = pad
        hf.config.pad_token_id = pad
    return Scorer(ckpt, _HFReward(hf), tokenizer, pad, device, dtype)


def _load_decoder_reward(ckpt: Checkpoint, dtype: "torch.dtype", trust_remote_code: bool) -> Any:
    """The folder as a `RewardModel` (last-token pooling) when it is a decoder with a bias-free
    `score` head, else None. Same weights and last-token rule as its sequence-classification
    class, plus what that class lacks: prefix sharing, padding on either side."""
    import warnings

    from rmkit.model import RewardModel

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an untied LM head without weights: eval never uses it
            return RewardModel.from_pretrained(ckpt.path, pooling="last", dtype=dtype,
                                               trust_remote_code=trust_remote_code)
    except Exception:  # not a decoder with rmkit's head (encoders, biased heads, custom poolers)
        return None


# ---- scoring -----------------------------------------------------------------------------------

def score_records(scorer: Scorer, records: list[Record], batch_size: int | None = None,
                  padding_side: str | None = None, progress: Callable[[int], None] | None = None,
                  prefix_sharing: bool | None = None) -> tuple[list["EncodedRecord"], list[list[float]]]:
    """Rewards for every response of every record, in record order (one process).

    prefix_sharing: None = wherever the model supports it (rmkit checkpoints and decoder reward
    folders; a folder run as AutoModelForSequenceClassification reads one row per response);
    False forces one row per response (the reference layout)."""
    import torch

    from rmkit.score import score_shard

    batch_size = default_batch_size(scorer.device) if batch_size is None else batch_size
    if batch_size < 1:
        raise RmkitError(f"--batch-size must be at least 1, got {batch_size}")
    side = padding_side or scorer.encoding.padding_side
    packs = getattr(scorer.model, "supports_packing", True)
    if side != "right" and not packs:
        raise ValueError("folders run as AutoModelForSequenceClassification are scored right-padded only")
    share = packs if prefix_sharing is None else prefix_sharing
    if share and not packs:
        raise ValueError("folders run as AutoModelForSequenceClassification cannot share the prompt: "
                         "they read one row per text")
    encoded = [scorer.encode(r) for r in records]
    rewards: list[list[float]] = [[] for _ in records]
    with torch.inference_mode():
        for i, r in score_shard(scorer.model, encoded, batch_size, scorer.pad_id, side, rank=0, world=1,
                                device=scorer.device, progress=progress,
                                prefix_sharing=share):
            rewards[i] = r
    return encoded, rewards


def set_result(records: list[Record], encoded: list["EncodedRecord"], rewards: list[list[float]]) -> "SetResult":
    """Accuracy, group metrics, margins, length baseline and truncation over one set."""
    from rmkit.score import SetResult, tally

    result = SetResult()
    for rec, enc, r in zip(records, encoded, rewards):
        tally(result, enc, r, [len(s) for s in rec.responses])
    return result


def pair_prompts(records: list[Record]) -> list[str]:
    """The prompt of every pair, in `Record.pairs()` order (the order `tally` counts them): pairs
    of one prompt text are one cluster of the bootstrap."""
    return [rec.prompt for rec in records for _ in rec.pairs()]


def pair_outcomes(records: list[Record], rewards: list[list[float]]) -> list[bool]:
    """Per pair, in `Record.pairs()` order: reward(better) > reward(worse); an equal reward is
    wrong, as `tally` counts it."""
    return [r[i] > r[j] for rec, r in zip(records, rewards) for i, j in rec.pairs()]


def length_outcomes(records: list[Record]) -> list[bool]:
    """Per pair: the better response is the longer one (in characters), as `tally` counts it."""
    return [len(rec.responses[i]) > len(rec.responses[j]) for rec in records for i, j in rec.pairs()]


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


def add_intervals(report: dict[str, Any], sets: list[EvalSet], outcomes: dict[str, list[list[bool]]],
                  n_resamples: int, seed: int) -> None:
    """Per set, one bootstrap over prompts shared by every checkpoint and the length baseline:
    each accuracy's interval, and each checkpoint's paired difference with the first one."""
    import numpy as np

    from rmkit.stats import LEVEL, cluster_ids, clustered_bootstrap

    report["bootstrap"] = {"unit": "prompt", "resamples": n_resamples, "seed": seed, "level": LEVEL,
                           "interval": "percentile"}
    first = report["checkpoints"][0]["label"]
    for s in sets:
        ids = cluster_ids(pair_prompts(s.records))
        cols = np.array([*outcomes[s.name], length_outcomes(s.records)], dtype=np.float64).T.reshape(len(ids), -1)
        b = clustered_bootstrap(ids, cols, n_resamples, seed)
        length = b.accuracy[-1]
        report["sets"][s.name].update(prompts=b.clusters, length_baseline=length.as_dict())
        for k, c in enumerate(report["checkpoints"]):
            r = c["results"][s.name]
            r["prompts"] = b.clusters
            r["accuracy_ci"] = [b.accuracy[k].lo, b.accuracy[k].hi]
            r["length_baseline_ci"] = [length.lo, length.hi]
            r["diff_vs_first"] = None if k == 0 else {"vs": first, **b.diff[k].as_dict()}


def _progress_bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rmkit.console import err_console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err_console, transient=True, disable=not err_console.is_terminal)


def run_eval(checkpoint_args: list[str], data: list[str] | None = None, domain: str | None = None,
             batch_size: int | None = None, max_length: int | None = None, json_out: Path | None = None,
             trust_remote_code: bool = False, padding_side: str | None = None,
             n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Evaluate every checkpoint on every set; returns (and with json_out writes) the report.
    Intervals come from `n_resamples` bootstrap resamples of prompts, seeded by `seed`."""
    import gc

    if batch_size is not None and batch_size < 1:
        raise RmkitError(f"--batch-size must be at least 1, got {batch_size}")
    if n_resamples < MIN_RESAMPLES:
        raise RmkitError(f"--bootstrap must be at least {MIN_RESAMPLES}, got {n_resamples}",
                         hint=f"the interval ends are the 2.5th and 97.5th percentiles; the default is "
                              f"{DEFAULT_RESAMPLES}")
    if not checkpoint_args:
        raise RmkitError("no checkpoint given", hint="rmkit eval CKPT [CKPT ...]")
    checkpoints = [inspect_checkpoint(p, max_length) for p in checkpoint_args]
    labels = [c.label for c in checkpoints]
    if len(set(labels)) != len(labels):
        raise RmkitError("a checkpoint is given twice", hint="list each folder once")
    for ckpt, name in zip(checkpoints, short_labels(checkpoints)):
        ckpt.name = name
    if json_out is not None and Path(json_out).is_dir():
        raise RmkitError(f"--json {json_out} is a folder", hint="give a file name, e.g. --json eval.json")
    sets = gather_sets(checkpoints, data or [], domain)

    import torch

    device, dtype = default_device()
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    report: dict[str, Any] = {
        "rmkit_version": __version__, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "batch_size": batch_size,
        "sets": {s.name: {"source": s.source, "records": len(s.records),
                          "pairs": sum(len(r.pairs()) for r in s.records)} for s in sets},
        "checkpoints": [],
    }
    outcomes: dict[str, list[list[bool]]] = {s.name: [] for s in sets}
    with _progress_bar() as bar:
        for ckpt in checkpoints:
            t_load = time.perf_counter()
            scorer = load_scorer(ckpt, device, dtype, trust_remote_code)
            entry: dict[str, Any] = {"label": ckpt.name, "given": ckpt.label, "path": str(ckpt.path.resolve()),
                                     "kind": ckpt.kind, "meta": ckpt.meta, "encoding": ckpt.encoding.as_dict(),
                                     "load_seconds": round(time.perf_counter() - t_load, 3), "results": {}}
            for s in sets:
                task = bar.add_task(f"{ckpt.name} · {s.name}", total=len(s.records),
                                    visible=len(s.records) >= PROGRESS_MIN_RECORDS)
                t0 = time.perf_counter()
                encoded, rewards = score_records(scorer, s.records, batch_size, padding_side,
                                                 progress=lambda n, t=task: bar.advance(t, n))
                seconds = time.perf_counter() - t0
                bar.remove_task(task)
                summary = set_result(s.records, encoded, rewards).summary()
                summary["seconds"] = round(seconds, 3)
                summary["pairs_per_s"] = round(summary["pairs"] / seconds, 2) if seconds > 0 else None
                entry["results"][s.name] = summary
                outcomes[s.name].append(pair_outcomes(s.records, rewards))
            report["checkpoints"].append(entry)
            del scorer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_intervals(report, sets, outcomes, n_resamples, seed)
    from rmkit.stats import strict_json

    report = strict_json(report)  # NaN (a figure with no denominator) -> null: strict JSON
    if json_out is not None:
        atomic_write_json(json_out, report)
    return report


# ---- the tables ----------------------------------------------------------------------------------

def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f}".replace("-0.0", "0.0")


def _with_ci(value: Any, ci: list[Any] | None) -> str:
    """'58.3 [44.1, 72.0]' in percent; '—' for a figure with no pairs."""
    if value is None or not ci or None in ci:
        return "—"
    return f"{_pct(value)} [{_pct(ci[0])}, {_pct(ci[1])}]"


def _diff(d: dict[str, Any] | None) -> str:
    """'+12.9 [10.1, 15.6]' in percentage points; '' for the first checkpoint (the reference)."""
    if not d or d.get("value") is None:
        return ""
    sign = "+" if d["value"] >= 0 else ""
    return f"{sign}{_pct(d['value'])} [{_pct(d['lo'])}, {_pct(d['hi'])}]".replace("+0.0", "0.0")


def _table(title: str) -> Any:
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False,
                 collapse_padding=True)


def report_table(report: dict[str, Any]) -> Any:
    """Accuracy with its interval, a section per set (its pairs/prompts on the set's row): a row
    per checkpoint, then the length baseline; with several checkpoints, each one's difference
    with the first. Every column is no-wrap and labels are short: the numbers line up in 80
    columns and in log files (widest case, a 20-character label beside 100.0 [100.0, 100.0] and
    -100.0 [-100.0, -100.0]: 79 columns)."""
    ckpts = report["checkpoints"]
    t = _table(f"rmkit eval ({report['device']}, {report['dtype']}): % of pairs ranked right")
    t.add_column("set / model", no_wrap=True)
    t.add_column("acc\n[95% CI]", justify="right", no_wrap=True)
    if len(ckpts) > 1:
        t.add_column("Δ vs first\n[95% CI]", justify="right", no_wrap=True)
    t.add_column("pairs/\nprompts", justify="right", no_wrap=True)
    pad = [""] if len(ckpts) > 1 else []
    for k, (name, s) in enumerate(report["sets"].items()):
        if k:
            t.add_section()
        t.add_row(name, "", *pad, f"{s['pairs']}/{s.get('prompts', '?')}", style="bold")
        for c in ckpts:
            r = c["results"][name]
            diff = [_diff(r.get("diff_vs_first"))] if pad else []
            t.add_row("  " + c["label"], _with_ci(r["accuracy"], r.get("accuracy_ci")), *diff, "")
        r = ckpts[0]["results"][name]
        t.add_row("  length baseline", _with_ci(r["length_baseline"], r.get("length_baseline_ci")), *pad, "",
                  style="dim")
    return t


def report_details(report: dict[str, Any]) -> Any:
    """The figures beside accuracy: margin, the paper's group metrics, ties, truncation."""
    t = _table("margin; all, top-2 in % of groups of 3+")
    t.add_column("set / model", no_wrap=True)
    for col in ("margin", "all", "top-2", "ties", "trunc"):
        t.add_column(col, justify="right", no_wrap=True)
    for k, name in enumerate(report["sets"]):
        if k:
            t.add_section()
        t.add_row(name, "", "", "", "", "", style="bold")
        for c in report["checkpoints"]:
            r = c["results"][name]
            margin = "—" if r["mean_margin"] is None or not r["pairs"] else f"{r['mean_margin']:+.3f}"
            t.add_row("  " + c["label"], margin, _pct(r["group_all_pairs_acc"]), _pct(r["group_top2_acc"]),
                      str(r["ties_skipped"]), f"{r['truncated']}/{r['records']}")
    return t


def report_matrix(report: dict[str, Any]) -> Any:
    """Checkpoint x set accuracy (e.g. each CRFT model on every domain and on general), only for
    2+ checkpoints on 2+ sets; intervals are in the long table and the JSON."""
    ckpts, names = report["checkpoints"], list(report["sets"])
    if len(ckpts) < 2 or len(names) < 2:
        return None
    t = _table("accuracy %, model x set")
    t.add_column("model", no_wrap=True)
    for name in names:
        t.add_column(name, justify="right", no_wrap=True)
    for c in ckpts:
        t.add_row(c["label"], *(_pct(c["results"][n]["accuracy"]) for n in names))
    t.add_row("length baseline", *(_pct(ckpts[0]["results"][n]["length_baseline"]) for n in names), style="dim")
    return t


def report_legend(report: dict[str, Any]) -> list[str]:
    """label = the folder as given, one line per checkpoint."""
    return [f"{c['label']} = {c.get('given', c['path'])}" for c in report["checkpoints"]]


def report_notes(report: dict[str, Any]) -> list[str]:
    """What the tables cannot show: the interval method, drops on read, truncation."""
    notes = []
    for name, s in report["sets"].items():
        dropped = s["source"].get("dropped") or {}
        if dropped:
            notes.append(f"{name}: dropped on read: " + ", ".join(f"{n} {why}" for why, n in dropped.items()))
    for c in report["checkpoints"]:
        cut = {n: r["truncated"] for n, r in c["results"].items() if r["truncated"]}
        if cut:
            notes.append(f"{c['label']}: records truncated to max_length {c['encoding']['max_length']}: "
                         + ", ".join(f"{n} {k}" for k, n in cut.items()))
    b = report.get("bootstrap")
    if b:
        first = report["checkpoints"][0]["label"]
        notes.append(f"[lo, hi]: {100 * b['level']:.0f}% percentile interval over {b['resamples']} bootstrap "
                     f"resamples of prompts (seed {b['seed']}; a prompt's pairs are drawn together)."
                     + (f" Δ: accuracy minus {first}'s, in points, on the same resamples." if len(report["checkpoints"]) > 1
                        else ""))
    notes.append("acc: pairs ranked right (equal scores are skipped and counted under ties; an equal reward "
                 "counts as wrong). length baseline: the longer response wins. margin: mean reward(better) - "
                 "reward(worse). all / top-2: records of 3+ responses with every pair right / with their two best "
                 "responses in order. trunc: records cut to max_length.")
    return notes


def render_report(report: dict[str, Any]) -> list[Any]:
    """Everything `rmkit eval` prints, in order: the accuracy table, the details, the matrix (2+
    models on 2+ sets), the legend, the notes."""
    from rich.text import Text

    out: list[Any] = [report_table(report), Text(""), report_details(report), Text("")]
    matrix = report_matrix(report)
    if matrix is not None:
        out += [matrix, Text("")]
    out += [Text(line) for line in report_legend(report)]
    out += [Text(note, style="dim") for note in report_notes(report)]
    return out


# ---- --score-only ------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict[str, Any]]:
    """{"prompt", "response"} rows; a bad row names its file and line."""
    if not path.exists():
        raise RmkitError(f"no such data file: {path}", where="--data", hint="paths are relative to the current folder")
    if path.is_dir():
        raise RmkitError(f"{path} is a folder; --score-only reads one JSONL file", where="--data")
    rows = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise RmkitError("a row must be a JSON object", where=where, hint='each line: {"prompt": ..., "response": ...}')
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise RmkitError(f"field '{key}' must be a string" + ("" if key in row else " (missing)"), where=where,
                                 hint='each line: {"prompt": ..., "response": ...}')
        rows.append(row)
    if not rows:
        raise RmkitError(f"{path} holds no rows", hint='each line: {"prompt": ..., "response": ...}')
    return rows


def score_file(checkpoint: str, data: Path, out: Path, batch_size: int | None = None,
               max_length: int | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Write each row back with its reward, in input order; returns counts (rows, truncated)."""
    if Path(out).resolve() == Path(data).resolve():
        raise RmkitError("-o would overwrite the --data file", hint="write the rewards to another file")
    ckpt = inspect_checkpoint(checkpoint, max_length)
    rows = read_rows(Path(data))
    records = [Record(r["prompt"], (r["response"],), (0.0,)) for r in rows]
    scorer = load_scorer(ckpt, trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    with _progress_bar() as bar:
        task = bar.add_task(f"{ckpt.label} · {Path(data).name}", total=len(records),
                            visible=len(records) >= PROGRESS_MIN_RECORDS)
        encoded, rewards = score_records(scorer, records, batch_size, progress=lambda n: bar.advance(task, n))
    seconds = time.perf_counter() - t0
    atomic_write_jsonl(out, ({**row, "reward": r[0]} for row, r in zip(rows, rewards)))
    return {"rows": len(rows), "truncated": sum(e.truncated for e in encoded), "seconds": seconds,
            "max_length": ckpt.encoding.max_length, "device": str(scorer.device)}
