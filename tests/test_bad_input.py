"""Malformed input through the real CLI: every case exits 2 with a specific message, prints no
traceback, and leaves no output file or folder behind (not even a `.tmp-` one).

Each case builds its inputs in a fresh folder and returns the argv, the expected message and the
paths that must not exist afterwards. `tests/test_data_cli.py` holds 11 more data cases (a
malformed JSONL line, a JSON array syntax error, a missing field, an unknown or missing DSP
domain, an empty file, only ties, a missing path, an unknown format, mixed mix weights and
oversampling, an unknown option) and `tests/test_eval.py` 8 `rmkit eval` cases; none is repeated
here. Cases that would fail inside a training process instead (a NaN loss, a full disk) are in
`tests/test_faults.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from rmkit.checkpoint import finalize
from rmkit.data.records import Record, write_records

REPO = Path(__file__).resolve().parents[1]
DSP = ("academy", "business", "entertainment", "literature", "normal")


@dataclass
class Case:
    args: list[str]
    message: str
    absent: list[Path]
    hint: bool = True  # the message says how to fix it ("hint:", or click's "Usage:" line)
    env: dict[str, str] | None = None  # set in the command's environment


Setup = Callable[[Path, Path], Case]
CASES: dict[str, Setup] = {}


def case(fn: Setup) -> Setup:
    CASES[fn.__name__] = fn
    return fn


def rmkit(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RMKIT_FAULT"}
    env.update(PYTHONPATH=str(REPO), COLUMNS="200", **(extra_env or {}))
    env.pop("RMKIT_NOPE", None)
    return subprocess.run([sys.executable, "-m", "rmkit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# --------------------------------------------------------------------------- helpers


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(n: int = 8) -> list[Record]:
    return [Record(f"## Human:\nq{i}\n\n## Assistant:\n", (" yes", " no"), (1.0, 0.0), "toy", "business")
            for i in range(n)]


def _convert(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["data", "convert", str(tmp / name), "-o", str(tmp / "out.jsonl"), *extra]


def _recipe(tmp: Path, model_path: Path | str, stage: str = "grft", domain: str | None = None,
            train_file: Path | None = None, **sections: str) -> Path:
    """A valid tiny recipe; `sections` replaces whole top-level lines (train=..., launch=...)."""
    data = train_file
    if data is None:
        data = tmp / "toy.jsonl"
        write_records(data, _pairs())
    lines = {
        "stage": f"stage: {stage}",
        "domain": f"domain: {domain}" if domain else "",
        "model": f'model: {{path: "{model_path}"}}',
        "data": f'data: {{train: [{{path: "{data}"}}], max_length: 64}}',
        "train": f'train: {{lr: 1.0e-3, global_batch: 4, micro_batch: 2, max_steps: 1, output_dir: "{tmp / "run"}"}}',
        "launch": "launch: {deepspeed: zero2, gpus: 1, precision: fp32}",
    }
    lines.update(sections)
    p = tmp / "recipe.yaml"
    p.write_text("\n".join(v for v in lines.values() if v) + "\n")
    return p


def _train(tmp: Path, recipe: Path, stage: str = "grft", *extra: str) -> list[str]:
    return ["train", stage, "--recipe", str(recipe), *extra]


def _grft_checkpoint(tmp: Path, model: Path, name: str = "grft", stage: str = "grft") -> Path:
    """A complete rmkit checkpoint folder (the tiny model + meta.json with its file table)."""
    staging = tmp / f".tmp-{name}"
    shutil.copytree(model, staging)
    dest = tmp / name
    finalize(staging, dest, {"stage": stage, "domain": None, "step": 4, "kind": "causal"})
    return dest


# --------------------------------------------------------------------------- data files


@case
def score_is_a_string(tmp: Path, model: Path) -> Case:
    _jsonl(tmp / "ts.jsonl", [{"text": ["\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b"],
                               "score": "high"}])
    return Case(_convert(tmp, "ts.jsonl"), f"{tmp / 'ts.jsonl'}:1: field 'score' must be a list of numbers, got str",
                [tmp / "out.jsonl"])


@case
def canonical_score_not_a_number(tmp: Path, model: Path) -> Case:
    _jsonl(tmp / "c.jsonl", [{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]},
                             {"prompt": "p", "responses": ["a", "b"], "scores": [1, "zero"]}])
    return Case(_convert(tmp, "c.jsonl"), f"{tmp / 'c.jsonl'}:2: field 'scores' must be a list of numbers",
                [tmp / "out.jsonl"], hint=False)


@case
def record_is_a_list(tmp: Path, model: Path) -> Case:
    (tmp / "l.jsonl").write_text('{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}\n["a", "b"]\n')
    return Case(_convert(tmp, "l.jsonl"), f"{tmp / 'l.jsonl'}:2: expected a JSON object, got list", [tmp / "out.jsonl"])


@case
def array_of_strings(tmp: Path, model: Path) -> Case:
    (tmp / "s.json").write_text('["a", "b"]')
    return Case(_convert(tmp, "s.json"), f"{tmp / 's.json'}: record 0: expected a JSON object, got str",
                [tmp / "out.jsonl"])


@case
def pretty_printed_object(tmp: Path, model: Path) -> Case:
    (tmp / "o.json").write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}, indent=2))
    return Case(_convert(tmp, "o.json"), f"{tmp / 'o.json'}:1: invalid JSON: Expecting property name enclosed in "
                "double quotes (column 2)", [tmp / "out.jsonl"])


@case
def texts_and_scores_differ_in_length(tmp: Path, model: Path) -> Case:
    _jsonl(tmp / "ts.jsonl", [{"text": ["\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b"],
                               "score": [1, 0, 2]}])
    return Case(_convert(tmp, "ts.jsonl"), f"{tmp / 'ts.jsonl'}:1: 2 texts but 3 scores", [tmp / "out.jsonl"])


@case
def a_single_response(tmp: Path, model: Path) -> Case:
    _jsonl(tmp / "ts.jsonl", [{"text": ["\n\nHuman: hi\n\nAssistant: a"], "score": [1]}])
    return Case(_convert(tmp, "ts.jsonl"), f"{tmp / 'ts.jsonl'}:1: a record needs at least 2 texts, got 1",
                [tmp / "out.jsonl"])


@case
def chosen_string_rejected_messages(tmp: Path, model: Path) -> Case:
    _jsonl(tmp / "cr.jsonl", [{"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}])
    return Case(_convert(tmp, "cr.jsonl"), f"{tmp / 'cr.jsonl'}:1: fields 'chosen' and 'rejected' must both be "
                "strings or both message lists", [tmp / "out.jsonl"], hint=False)


@case
def unknown_chat_role(tmp: Path, model: Path) -> Case:
    _jsonl(tmp / "cr.jsonl", [{"chosen": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}],
                               "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}])
    return Case(_convert(tmp, "cr.jsonl"), "field 'chosen' has a message with unknown role 'bot'", [tmp / "out.jsonl"])


@case
def not_utf8(tmp: Path, model: Path) -> Case:
    (tmp / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    return Case(_convert(tmp, "latin1.jsonl"), f"{tmp / 'latin1.jsonl'}: not UTF-8 text (invalid continuation byte",
                [tmp / "out.jsonl"])


@case
def fields_of_no_known_format(tmp: Path, model: Path) -> Case:
    _jsonl(tmp / "x.jsonl", [{"question": "q", "answer": "a"}])
    return Case(_convert(tmp, "x.jsonl"), f"{tmp / 'x.jsonl'}: cannot tell the format from the fields answer, question",
                [tmp / "out.jsonl"])


@case
def dsp_response_not_a_string(tmp: Path, model: Path) -> Case:
    rows = [{"query": f"q{i}", "responses": {k: f"{k} {i}" for k in DSP}} for i in range(3)]
    rows[2]["responses"]["business"] = 7
    (tmp / "dsp.json").write_text(json.dumps(rows))
    return Case(_convert(tmp, "dsp.json", "--domain", "business"),
                f"{tmp / 'dsp.json'}: record 2: field 'responses.business' must be a string, got int", [tmp / "out.jsonl"],
                hint=False)


@case
def dsp_record_lacks_the_domain(tmp: Path, model: Path) -> Case:
    rows = [{"query": f"q{i}", "responses": {k: f"{k} {i}" for k in DSP}} for i in range(3)]
    del rows[1]["responses"]["business"]
    (tmp / "dsp.json").write_text(json.dumps(rows))
    return Case(_convert(tmp, "dsp.json", "--domain", "business"),
                f"{tmp / 'dsp.json'}: record 1: field 'responses' lacks domain 'business'", [tmp / "out.jsonl"])


@case
def damaged_parquet(tmp: Path, model: Path) -> Case:
    (tmp / "d.parquet").write_bytes(b"PAR1 this is not really parquet")
    return Case(_convert(tmp, "d.parquet"), f"{tmp / 'd.parquet'}: cannot read parquet", [tmp / "out.jsonl"])


@case
def output_inside_a_file(tmp: Path, model: Path) -> Case:
    write_records(tmp / "ok.jsonl", _pairs())
    (tmp / "afile").write_text("x")
    return Case(["data", "convert", str(tmp / "ok.jsonl"), "-o", str(tmp / "afile" / "out.jsonl")],
                f"cannot write {tmp / 'afile' / 'out.jsonl'}: File exists", [tmp / "afile" / "out.jsonl"])


@case
def output_is_the_input(tmp: Path, model: Path) -> Case:
    write_records(tmp / "ok.jsonl", _pairs())
    return Case(["data", "convert", str(tmp / "ok.jsonl"), "-o", str(tmp / "ok.jsonl")],
                f"the output {tmp / 'ok.jsonl'} is the input file", [])


@case
def split_fraction_above_one(tmp: Path, model: Path) -> Case:
    write_records(tmp / "ok.jsonl", _pairs())
    return Case(["data", "split", str(tmp / "ok.jsonl"), "--test", "1.5", "-o", str(tmp / "sp")],
                "test fraction must be between 0 and 1, got 1.5\n  hint: e.g. --test 0.1 for 10%", [tmp / "sp"])


@case
def mix_source_missing(tmp: Path, model: Path) -> Case:
    write_records(tmp / "ok.jsonl", _pairs())
    return Case(["data", "mix", "--source", f"{tmp / 'ok.jsonl'}:1", "--source", f"{tmp / 'gone.jsonl'}:1",
                 "--seed", "1", "-o", str(tmp / "m.jsonl")],
                f"no such file or folder: {tmp / 'gone.jsonl'}", [tmp / "m.jsonl", tmp / "m.manifest.json"])


# --------------------------------------------------------------------------- recipes


@case
def recipe_unknown_key(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, model, train=f'train: {{lr: 1.0e-3, global_bach: 4, output_dir: "{tmp / "run"}"}}')
    return Case(_train(tmp, r, "grft", "--dry-run"), "train.global_bach: unknown key (did you mean 'global_batch'?)",
                [tmp / "run"])


@case
def recipe_wrong_type(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, model, train=f'train: {{lr: 1.0e-3, global_batch: eight, output_dir: "{tmp / "run"}"}}')
    return Case(_train(tmp, r, "grft", "--dry-run"),
                "train.global_batch: Input should be a valid integer, unable to parse string as an integer (got 'eight')",
                [tmp / "run"])


@case
def recipe_three_mistakes_at_once(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, model, train=f'train: {{global_batch: -4, warmup: 10, output_dir: "{tmp / "run"}"}}')
    return Case(_train(tmp, r, "grft", "--dry-run"), "3 problems in the recipe:\n"
                "  train.lr: required field is missing\n"
                "  train.global_batch: Input should be greater than 0 (got -4)\n"
                "  train.warmup: unknown key (did you mean 'warmup_steps'?)", [tmp / "run"])


@case
def recipe_bad_yaml(tmp: Path, model: Path) -> Case:
    (tmp / "recipe.yaml").write_text("stage: grft\nmodel: {path: x\ntrain:\n  lr: 1\n")
    return Case(_train(tmp, tmp / "recipe.yaml"), f"{tmp / 'recipe.yaml'}:3: invalid YAML:", [tmp / "run"])


@case
def recipe_missing_file(tmp: Path, model: Path) -> Case:
    return Case(_train(tmp, tmp / "nope.yaml"), f"no such recipe: {tmp / 'nope.yaml'}", [tmp / "run"])


@case
def recipe_not_a_mapping(tmp: Path, model: Path) -> Case:
    (tmp / "recipe.yaml").write_text("- stage: grft\n")
    return Case(_train(tmp, tmp / "recipe.yaml"),
                f"{tmp / 'recipe.yaml'}: a recipe must be a YAML mapping (stage:, model:, data:, ...)", [tmp / "run"])


@case
def recipe_unknown_deepspeed_config(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, model, launch="launch: {deepspeed: zero9, gpus: 1, precision: fp32}")
    return Case(_train(tmp, r, "grft", "--dry-run"), "launch.deepspeed: unknown DeepSpeed config 'zero9'\n"
                "  hint: did you mean 'zero3'? named configs: zero0, zero1, zero2, zero3, zero3_offload", [tmp / "run"])


@case
def deepspeed_config_sets_batch(tmp: Path, model: Path) -> Case:
    (tmp / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 8}))
    r = _recipe(tmp, model, launch=f'launch: {{deepspeed: "{tmp / "ds.json"}", gpus: 1, precision: fp32}}')
    return Case(_train(tmp, r), f"{tmp / 'ds.json'}: 'train_batch_size' must not be set in a DeepSpeed config file",
                [tmp / "run"])


@case
def recipe_global_batch_not_divisible(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, model, train=f'train: {{lr: 1.0e-3, global_batch: 6, micro_batch: 4, output_dir: "{tmp / "run"}"}}')
    return Case(_train(tmp, r, "grft", "--dry-run"), "recipe: train.global_batch 6 is not divisible by micro_batch x "
                "processes = 4 x 1 = 4", [tmp / "run"])


@case
def crft_without_domain(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, _grft_checkpoint(tmp, model), stage="crft")
    return Case(_train(tmp, r, "crft", "--dry-run"),
                "(top): a crft recipe needs a domain (set `domain:` or pass --domain)", [tmp / "run"])


@case
def recipe_for_another_stage(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, model)
    return Case(_train(tmp, r, "crft", "--domain", "business"),
                f"{r}: recipe is for stage 'grft', but `rmkit train crft` was run", [tmp / "run"])


@case
def recipe_unset_environment_variable(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, model, model='model: {path: "${RMKIT_NOPE}/tiny"}')
    return Case(_train(tmp, r, "grft", "--dry-run"), "recipe: environment variable RMKIT_NOPE is not set", [tmp / "run"])


@case
def recipe_data_file_missing(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, model, train_file=tmp / "gone.jsonl")
    return Case(_train(tmp, r), f"data.train.0: no such data file: {tmp / 'gone.jsonl'}", [tmp / "run"])


@case
def recipe_data_file_malformed(tmp: Path, model: Path) -> Case:
    """The run folder is made before the data is read: a bad file must not leave it behind."""
    good = tmp / "good.jsonl"
    write_records(good, _pairs())
    (tmp / "bad.jsonl").write_text('{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}\n{"prompt": \n')
    r = _recipe(tmp, model, data=f'data: {{train: [{{path: "{good}"}}], eval: {{x: {{path: "{tmp / "bad.jsonl"}"}}}}}}')
    return Case(_train(tmp, r), f"{tmp / 'bad.jsonl'}:2: invalid JSON: Expecting value (column 12)", [tmp / "run"])


@case
def recipe_model_not_found(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, tmp / "no-model")
    return Case(_train(tmp, r, "grft", "--dry-run"),
                f"model '{tmp / 'no-model'}' is neither a built-in name nor an existing folder", [tmp / "run"])


@case
def recipe_fp16_on_cpu(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, model, launch="launch: {deepspeed: zero2, gpus: 1, precision: fp16}")
    return Case(_train(tmp, r, "grft", "--dry-run"), "launch.precision: fp16 needs a GPU", [tmp / "run"])


@case
def allocator_setting_unknown(tmp: Path, model: Path) -> Case:
    return Case(_train(tmp, _recipe(tmp, model), "grft", "--dry-run"),
                "RMKIT_MALLOC: 'jemalloc' is not an allocator setting\n"
                "  hint: set RMKIT_MALLOC to keep (the default) or system, or unset it", [tmp / "run"],
                env={"RMKIT_MALLOC": "jemalloc"})


@case
def recipe_on_nonfinite_unknown(tmp: Path, model: Path) -> Case:
    r = _recipe(tmp, model, train=f'train: {{lr: 1.0e-3, global_batch: 4, on_nonfinite: ignore, output_dir: "{tmp / "run"}"}}')
    return Case(_train(tmp, r, "grft", "--dry-run"), "train.on_nonfinite: Input should be 'stop' or 'skip' (got 'ignore')",
                [tmp / "run"])


# --------------------------------------------------------------------------- checkpoints


def _crft(tmp: Path, parent: Path) -> list[str]:
    return _train(tmp, _recipe(tmp, parent, stage="crft", domain="business"), "crft")


@case
def parent_lacks_a_file(tmp: Path, model: Path) -> Case:
    parent = _grft_checkpoint(tmp, model)
    (parent / "tokenizer.json").unlink()
    return Case(_crft(tmp, parent), f"model.path: {parent} is not a complete rmkit checkpoint: tokenizer.json is missing",
                [tmp / "run"])


@case
def parent_file_resized(tmp: Path, model: Path) -> Case:
    parent = _grft_checkpoint(tmp, model)
    size = (parent / "config.json").stat().st_size
    with open(parent / "config.json", "a") as f:
        f.write(" ")
    return Case(_crft(tmp, parent), f"is not a complete rmkit checkpoint: config.json has {size + 1} bytes, "
                f"meta.json recorded {size}", [tmp / "run"])


@case
def parent_meta_truncated(tmp: Path, model: Path) -> Case:
    parent = _grft_checkpoint(tmp, model)
    text = (parent / "meta.json").read_text()
    (parent / "meta.json").write_text(text[: len(text) // 2])
    return Case(_crft(tmp, parent), f"{parent} is not a complete rmkit checkpoint: meta.json is unreadable", [tmp / "run"])


@case
def parent_meta_without_file_table(tmp: Path, model: Path) -> Case:
    parent = _grft_checkpoint(tmp, model)
    (parent / "meta.json").write_text(json.dumps({"stage": "grft", "step": 4}))
    return Case(_crft(tmp, parent), f"{parent} is not a complete rmkit checkpoint: meta.json has no file table ('files')",
                [tmp / "run"])


@case
def parent_is_an_unfinished_save(tmp: Path, model: Path) -> Case:
    """Killed after meta.json was written but before the rename: still a `.tmp-` folder."""
    done = _grft_checkpoint(tmp, model)
    parent = tmp / ".tmp-step-000004"
    done.rename(parent)
    return Case(_crft(tmp, parent), f"{parent} is not a complete rmkit checkpoint: it is a temporary folder of an "
                "unfinished save", [tmp / "run"])


@case
def parent_is_a_blt_checkpoint(tmp: Path, model: Path) -> Case:
    parent = _grft_checkpoint(tmp, model, name="blt", stage="blt")
    return Case(_crft(tmp, parent), f"model.path: CRFT must start from a GRFT checkpoint, but {parent} is a 'blt' "
                "checkpoint", [tmp / "run"])


def _resized_model(tmp: Path, model: Path, hidden: int) -> Path:
    """The tiny model's architecture at another width: the weights of a different base model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    config.hidden_size, config.intermediate_size = hidden, 2 * hidden
    other = tmp / f"other-{hidden}"
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    return other / "model.safetensors"


@case
def weights_of_another_shape(tmp: Path, model: Path) -> Case:
    folder = tmp / "model"
    shutil.copytree(model, folder)
    shutil.copy(_resized_model(tmp, model, 48), folder / "model.safetensors")
    return Case(_train(tmp, _recipe(tmp, folder), "grft", "--dry-run"),
                f"model.path: the weights in {folder} do not fit its config.json: model.safetensors: "
                "model.embed_tokens.weight has shape [", [tmp / "run"])


@case
def parent_with_another_base_model(tmp: Path, model: Path) -> Case:
    """A GRFT checkpoint whose weights were swapped for another base model's, file table updated."""
    parent = _grft_checkpoint(tmp, model)
    shutil.copy(_resized_model(tmp, model, 64), parent / "model.safetensors")
    meta = json.loads((parent / "meta.json").read_text())
    meta["files"]["model.safetensors"] = (parent / "model.safetensors").stat().st_size
    (parent / "meta.json").write_text(json.dumps(meta))
    return Case(_crft(tmp, parent), f"model.path: the weights in {parent} do not fit its config.json", [tmp / "run"])


@case
def pickle_only_weights(tmp: Path, model: Path) -> Case:
    import torch
    from safetensors.torch import load_file

    folder = tmp / "pickled"
    shutil.copytree(model, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return Case(_train(tmp, _recipe(tmp, folder), "grft", "--dry-run"),
                f"model folder {folder} lacks weights as safetensors", [tmp / "run"])


@case
def safetensors_header_damaged(tmp: Path, model: Path) -> Case:
    folder = tmp / "damaged"
    shutil.copytree(model, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return Case(_train(tmp, _recipe(tmp, folder), "grft", "--dry-run"),
                f"model.path: {folder / 'model.safetensors'} is not a readable safetensors file", [tmp / "run"])


@case
def eval_checkpoint_file_resized(tmp: Path, model: Path) -> Case:
    ckpt = _grft_checkpoint(tmp, model)
    size = (ckpt / "model.safetensors").stat().st_size
    with open(ckpt / "model.safetensors", "r+b") as f:
        f.truncate(size - 8)
    return Case(["eval", str(ckpt)], f"{ckpt} is not a complete rmkit checkpoint: model.safetensors has {size - 8} "
                f"bytes, meta.json recorded {size}", [])


def _reward_folder(tmp: Path, model: Path, weights: Path | None = None) -> Path:
    """A plain Hugging Face reward folder (no meta.json): the tiny model plus a score head."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp / "reward"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                  id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(weights or folder / "model.safetensors"))
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    tensors["score.weight"] = torch.full((1, hidden), 0.01)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@case
def eval_weights_of_another_shape(tmp: Path, model: Path) -> Case:
    folder = _reward_folder(tmp, model, _resized_model(tmp, model, 48))
    write_records(tmp / "pairs.jsonl", _pairs())
    return Case(["eval", str(folder), "--data", str(tmp / "pairs.jsonl"), "--json", str(tmp / "eval.json")],
                f"could not load {folder}: RuntimeError: You set `ignore_mismatched_sizes` to `False`",
                [tmp / "eval.json"])


@case
def eval_report_inside_a_file(tmp: Path, model: Path) -> Case:
    staging = _reward_folder(tmp, model)
    folder = tmp / "ckpt"
    finalize(staging, folder, {"stage": "grft", "domain": None, "step": 4, "kind": "reward", "pooling": "last",
                               "encoding": {"max_length": 64, "truncation_side": "left", "padding_side": "right",
                                            "append_eos": False}})
    write_records(tmp / "pairs.jsonl", _pairs())
    (tmp / "afile").write_text("x")
    return Case(["eval", str(folder), "--data", str(tmp / "pairs.jsonl"), "--json", str(tmp / "afile" / "eval.json")],
                f"cannot write {tmp / 'afile' / 'eval.json'}: File exists", [tmp / "afile" / "eval.json"])


@case
def merge_of_a_full_checkpoint(tmp: Path, model: Path) -> Case:
    ckpt = _grft_checkpoint(tmp, model)
    return Case(["merge", str(ckpt), "-o", str(tmp / "merged")],
                f"{ckpt} is not a LoRA adapter checkpoint (meta.json kind 'causal')", [tmp / "merged"])


# --------------------------------------------------------------------------- CLI arguments


@case
def set_without_equals(tmp: Path, model: Path) -> Case:
    return Case(_train(tmp, _recipe(tmp, model), "grft", "--set", "train.lr"), "--set 'train.lr' is not key=value",
                [tmp / "run"])


@case
def set_into_a_value(tmp: Path, model: Path) -> Case:
    return Case(_train(tmp, _recipe(tmp, model), "grft", "--set", "train.lr.x=1"),
                "--set train.lr.x: train.lr is a value, not a section", [tmp / "run"])


@case
def set_list_index_out_of_range(tmp: Path, model: Path) -> Case:
    return Case(_train(tmp, _recipe(tmp, model), "grft", "--set", "data.train.3.path=x"),
                "--set data.train.3.path: data.train has no item 3", [tmp / "run"])


@case
def set_wrong_type(tmp: Path, model: Path) -> Case:
    return Case(_train(tmp, _recipe(tmp, model), "grft", "--set", "train.max_steps=lots"),
                "train.max_steps: Input should be a valid integer, unable to parse string as an integer (got 'lots')",
                [tmp / "run"])


@case
def unknown_option(tmp: Path, model: Path) -> Case:
    return Case(_train(tmp, _recipe(tmp, model), "grft", "--epochs", "3"), "No such option: --epochs", [tmp / "run"])


@case
def missing_argument(tmp: Path, model: Path) -> Case:
    return Case(["data", "convert", "-o", str(tmp / "out.jsonl")], "Error: Missing argument 'input'.", [tmp / "out.jsonl"])


@case
def option_without_value(tmp: Path, model: Path) -> Case:
    return Case(["train", "grft", "--recipe"], "Error: Option '--recipe' requires an argument.", [], hint=False)


@case
def unknown_command(tmp: Path, model: Path) -> Case:
    return Case(["trian", "grft"], "No such command 'trian'", [])


@case
def resume_with_nothing_to_resume(tmp: Path, model: Path) -> Case:
    return Case(_train(tmp, _recipe(tmp, model), "grft", "--resume"), f"nothing to resume in {tmp / 'run'}", [tmp / "run"])


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    c = CASES[name](tmp_path, tiny_model_dir)
    before = {p for p in tmp_path.rglob("*")}
    res = rmkit(c.args, cwd=tmp_path, extra_env=c.env)
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert c.message in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert not c.hint or "hint:" in res.stderr or "Usage:" in res.stderr, res.stderr[-3000:]
    for path in c.absent:
        assert not path.exists(), path
    left = {p for p in tmp_path.rglob("*")} - before
    assert not left, sorted(left)  # nothing written anywhere, not even a temporary file


def test_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30
