"""Training throughput: rmkit against what users really run, on the same records in the same order.

    python bench/throughput.py                        # smollm2-135m, 32 pairs, max length 256, batch 8, 3 reps
    python bench/throughput.py --pairs 8 --batch 4 --reps 1   # a short run

Every mode trains the same model from the same weights on the same pairs (the first --pairs HH
helpful pairs for GRFT, the first DSP --domain pairs for CRFT: a query's four pairs in a row, as
the original code's `dsp_<domain>_pairs` files hold them; only pairs whose rows fit
--max-length, so nothing truncates). Step k trains records k*B .. k*B+B-1 (mod the pairs) in
every mode; --batch pairs per optimizer step, AdamW, grad clip 1.0, in the precision
`launch.precision: auto` picks on this machine (or --precision). Each run is a fresh subprocess
(so peak RSS is its own): --warmup untimed steps, then --steps timed steps. --reps repetitions,
the modes' order rotated each time; the table gives the median and the min-max spread.

  grft/rmkit      the real `Trainer.train_step` (RewardModel + losses + DeepSpeed ZeRO-0 engine,
                  world size 1, in-process): records sharing a prompt grouped (each distinct text
                  once), the layout `choose_layout` picks (on a CPU: flat, one unpadded row with
                  span attention), eos pooling, --micro records per micro-batch with gradient
                  accumulation
  grft/rmkit-packed  the same with the layout rule before the flat layout (packed rows with a 4-D
                  mask or one row per response, whichever costs less): what span attention buys
  grft/trl        trl.RewardTrainer, gradient checkpointing off (its default, and the faster), all
                  --batch pairs in one micro-batch (its per_device_train_batch_size); grft/trl@N
                  at N pairs per micro-batch with gradient accumulation (less padding); rmkit's
                  ratio is against the fastest TRL run measured
  grft/trl-gc     the same with gradient checkpointing on (its memory-saving setting)
  grft/original   the original DSP code (Linear95/DSP) as its authors run it (scripts/train.sh:
                  micro-batch 1 with gradient accumulation, so train.py pads nothing but the pair:
                  each pair's two rows padded to the longer; lm_logits = lm_head(hidden) for every
                  row and position and the LM loss computed whatever its weight)
  grft/padmax     the same cost with every row padded to max_length and all B pairs in one
                  micro-batch (what its collator does when a micro-batch holds more than one record)
  crft/*          as above with the imitation loss on (rmkit: target `whole`, the paper's
                  reduction `sequence`; the original: its LM loss weighted in)

pairs/s counts preference pairs trained per second. CPU s/step is the process's CPU time: on a
shared machine it moves less with other load than wall time. "computed/distinct" is the token
positions a mode runs through the decoder over the distinct tokens of its records (each prompt
and each distinct response once: the physical floor of work). MFU = the matmul FLOPs a mode
executes (PaLM's count: 6 N + 12 n_layer d T per position for a row of T positions, N the
decoder's matmul parameters, plus 6 V d per position that goes through the LM head) per second,
over this machine's measured matmul rate at the precision used (printed at the start).
Results print as a table and are appended to docs/benchmarks.md. --profile runs torch.profiler
around every mode's timed steps and prints where the time goes (self CPU time of each operator,
grouped: matmuls, the attention kernel, copies and casts, the optimizer, the rest), which is what
bounds MFU; its overhead is in that run's timings, so compare profiled runs with each other only.
--memory splits each mode's peak RSS: the training state (weights, gradients, AdamW's moments: 16
bytes per parameter in fp32), the activations of its largest micro-batch (what autograd saved for
backward, counted by a saved-tensors hook, and the positions it held), and the rest (libraries,
blocks the allocator keeps, transients). The hook runs on every saved tensor: report timings from
runs without it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = Path(os.environ.get("RMKIT_DATA", REPO.parent / "shared" / "data"))
MODES = ("grft/rmkit", "grft/rmkit-packed", "grft/trl", "grft/trl-gc", "grft/original", "grft/padmax",
         "crft/rmkit", "crft/rmkit-packed", "crft/original", "crft/padmax")
BASELINE = {"grft/rmkit": "grft/trl", "grft/rmkit-packed": "grft/trl", "grft/trl-gc": "grft/trl",
            "grft/original": "grft/trl", "grft/padmax": "grft/trl", "crft/rmkit": "crft/original",
            "crft/rmkit-packed": "crft/original", "crft/padmax": "crft/original"}
MICRO_MODES = ("rmkit", "rmkit-packed", "trl", "trl-gc")  # the modes that take MODE@N
LR = 1e-5


def recipe_micro(stage: str) -> int:
    """rmkit's records per micro-batch by default: what recipes/cpu/STAGE.yaml ships (chosen there by memory)."""
    import yaml

    from rmkit.recipe import resolve_recipe_path

    return int(yaml.safe_load(resolve_recipe_path(f"cpu/{stage}").read_text())["train"]["micro_batch"])


# ---- data ---------------------------------------------------------------------------------------

def select_pairs(stage: str, tokenizer: Any, n: int, max_length: int, domain: str) -> list[Any]:
    """The first n strict pairs of the stage's data whose rows (with eos) fit max_length - 2
    (TRL tokenizes prompt + response as one text: a token or two of slack keeps it unfiltered)."""
    from rmkit.data.collate import encode_record
    from rmkit.data.readers import load_source

    path = DATA / ("helpful.json" if stage == "grft" else "dsp.json")
    records = load_source(path, domain=None if stage == "grft" else domain).records
    out = []
    for rec in records:
        if len(rec.responses) != 2 or rec.scores[0] == rec.scores[1]:
            continue
        enc = encode_record(rec, tokenizer, max_length - 2, "left", append_eos=True)
        if not enc.truncated:
            out.append(rec)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} pairs of {path} fit max_length {max_length}; lower --pairs")


def step_ids(step: int, batch: int, n: int) -> list[int]:
    """The records of optimizer step `step`, the same in every mode."""
    return [(step * batch + i) % n for i in range(batch)]


def work(mode: str, encoded: list[Any], spec: dict[str, Any]) -> dict[str, float]:
    """Positions and rows each mode runs through the decoder in the timed steps, from the rows'
    lengths (rmkit's are counted from its real batches instead), and the distinct tokens."""
    impl = split_mode(mode)[0].split("/")[1]
    n, b, ml = len(encoded), spec["batch"], spec["max_length"]
    positions = square = 0.0
    distinct = 0
    for step in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        encs = [encoded[i] for i in step_ids(step, b, n)]
        prompts = {tuple(e.prompt_ids) for e in encs}
        texts = {(tuple(e.prompt_ids), tuple(r)) for e in encs for r in e.response_ids}
        distinct += sum(len(q) for q in prompts) + sum(len(r) for _, r in texts)
        if impl.startswith("trl"):  # chosen and rejected concatenated, padded to the micro-batch's longest
            for start in range(0, b, spec["micro"]):
                part = encs[start:start + spec["micro"]]
                width = max(max(e.row_lengths()) for e in part)
                positions += 2 * len(part) * width
                square += 2 * len(part) * width ** 2
        elif impl == "original":  # micro-batch 1: each pair padded to its longer row
            for e in encs:
                positions += 2 * max(e.row_lengths())
                square += 2 * max(e.row_lengths()) ** 2
        elif impl == "padmax":
            positions += 2 * b * ml
            square += 2 * b * ml ** 2
    return {"positions": positions, "square": square, "distinct": float(distinct)}


# ---- workers: one mode each, in its own process ----------------------------------------------------

PROFILE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention kernel", ("scaled_dot_product", "flash_attention")),
    ("copies, casts, concatenation", ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone")),
    ("optimizer", ("adam",)),
)


def profile_group(op: str) -> str:
    """The group an operator's self time counts in (the first that names it), else 'the rest'."""
    for name, keys in PROFILE_GROUPS:
        if op in keys or any(k in op.lower() for k in keys if not k.startswith("aten::")):
            return name
    return "the rest"


def start_profile(spec: dict[str, Any]) -> Any:
    """A started torch.profiler (CPU operators) when the run is profiled, else None."""
    if not spec.get("profile"):
        return None
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    prof.start()
    return prof


def stop_profile(prof: Any) -> dict[str, Any]:
    """Self CPU seconds per operator of a started profiler (empty when there is none)."""
    if prof is None:
        return {}
    prof.stop()
    ops = [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
    return {"profile": sorted((o for o in ops if o[2] > 0), key=lambda o: -o[2])}


class SavedTally:
    """What autograd keeps for backward in each micro-batch (a mode's activation memory):
    the bytes of every distinct storage the pack hook sees, parameters (leaves that require grad)
    excluded, and the positions its embedding lookups read; `close()` at each backward records
    the micro-batch and starts the next. Installed around a whole run by `track_saved`; with
    gradient checkpointing on, the checkpointed layers' own hooks hide what they save."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}
        self.positions = 0
        self.micro_batches: list[tuple[int, int]] = []  # (bytes saved, positions)

    def pack(self, t: Any) -> Any:
        if not (t.is_leaf and t.requires_grad):
            st = t.untyped_storage()
            self.storages.setdefault(st.data_ptr(), st.nbytes())
        return t

    def close(self) -> None:
        if self.storages or self.positions:
            self.micro_batches.append((sum(self.storages.values()), self.positions))
        self.storages, self.positions = {}, 0

    def largest(self) -> dict[str, float]:
        """The micro-batch that saved the most: its MB and positions (0s when none ran)."""
        saved, positions = max(self.micro_batches, default=(0, 0))
        return {"saved_mb": saved / 2**20, "saved_positions": positions}


@contextlib.contextmanager
def track_saved(tally: SavedTally) -> Iterator[SavedTally]:
    """Inside: every forward's saved tensors go through `tally`; each `Tensor.backward` (rmkit's
    engine, TRL's accelerator and the original code all end there) closes a micro-batch; each
    `F.embedding` under grad adds its positions. Everything is put back on exit."""
    import torch
    import torch.nn.functional as F

    real_backward, real_embedding = torch.Tensor.backward, F.embedding

    def backward(self: Any, *a: Any, **k: Any) -> Any:
        tally.close()
        return real_backward(self, *a, **k)

    def embedding(input: Any, *a: Any, **k: Any) -> Any:
        if torch.is_grad_enabled():
            tally.positions += input.numel()
        return real_embedding(input, *a, **k)

    torch.Tensor.backward, F.embedding = backward, embedding  # type: ignore[method-assign]
    try:
        with torch.autograd.graph.saved_tensors_hooks(tally.pack, lambda t: t):
            yield tally
    finally:
        torch.Tensor.backward, F.embedding = real_backward, real_embedding  # type: ignore[method-assign]


def state_mb(model_dir: Path) -> float:
    """MB of weights, gradients and AdamW's two moments in fp32 (16 bytes per parameter, every
    tensor of the model's safetensors trained): what every mode holds before any activation."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n += math.prod(shape)
    return 16 * n / 2**20


def autocast(precision: str) -> Any:
    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def worker_rmkit(spec: dict[str, Any], imitation_weight: float) -> dict[str, Any]:
    import rmkit.train.loop as loop
    from rmkit.recipe import Recipe
    from rmkit.train.rundir import plan_run, write_run_dir

    recipe = Recipe.model_validate({
        # stage grft with an imitation weight runs exactly CRFT's loss, without CRFT's
        # parent-checkpoint check (the bench starts every mode from the same base model)
        "stage": "grft", "model": {"path": spec["model"], "pooling": "eos"},
        "data": {"train": [{"path": spec["data"], "format": "canonical"}], "max_length": spec["max_length"],
                 "padding_side": "right", "prefix_sharing": spec["prefix_sharing"]},
        "loss": {"imitation_weight": imitation_weight, "imitation_target": "whole",
                 "imitation_reduction": "sequence"},
        "train": {"lr": LR, "schedule": "constant", "global_batch": spec["batch"], "micro_batch": spec["micro"],
                  "max_steps": spec["warmup"] + spec["steps"], "seed": 0, "output_dir": spec["tmp"] + "/run",
                  "gradient_checkpointing": spec.get("checkpoint_every") or False},
        "launch": {"deepspeed": "zero0", "gpus": 1, "precision": spec["precision"]},
    })
    plan = plan_run(recipe)
    write_run_dir(recipe, plan)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    counted = {"positions": 0.0, "square": 0.0, "lm": 0.0, "on": False}
    real_collate = loop.collate

    def counting_collate(*a: Any, **k: Any) -> Any:
        batch = real_collate(*a, **k)
        if counted["on"]:
            rows, width = batch.input_ids.shape
            counted["positions"] += rows * width
            if batch.spans is not None:  # query-key pairs of each span: its queries x (prefix + itself)
                counted["square"] += sum((q1 - q0) * (q1 - q0 + p1 - p0) for q0, q1, p0, p1 in batch.spans.tolist())
            else:
                counted["square"] += rows * width ** 2
            counted["lm"] += batch.n_lm_targets
        return batch

    n = len(Path(spec["data"]).read_text().splitlines())
    loop.collate = counting_collate
    if spec.get("packed_rule"):  # the layout rule without span attention
        real_choose = loop.choose_layout
        loop.choose_layout = lambda encs, sharing, spans, *a, **k: real_choose(encs, sharing, False, *a, **k)
    loop.step_records = lambda step, n_, batch, seed, groups=None: step_ids(step, batch, n)  # the shared order
    runner = loop.Trainer(plan.run_dir)  # DeepSpeed's engine in this process (a world of one)
    import torch

    torch.set_num_threads(spec["threads"])  # the Trainer takes all cores; every mode gets the same
    runner.engine.train()
    if spec.get("compile"):
        runner.model.base_model.compile(dynamic=True)  # in place: parameter names unchanged
    for step in range(spec["warmup"]):
        runner.train_step(step)
    counted["on"] = True
    prof = start_profile(spec)
    t0, c0 = time.perf_counter(), time.process_time()
    pairs = 0
    for step in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        pairs += runner.train_step(step)["pairs"]
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "pairs": pairs, **stop_profile(prof),
            "positions": counted["positions"], "square": counted["square"], "lm_positions": counted["lm"]}


def worker_trl(spec: dict[str, Any], checkpointing: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    from rmkit.data.records import read_records
    from rmkit.tokenizer import load_tokenizer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.config.pad_token_id = tok.pad_token_id
    records = read_records(Path(spec["data"]))
    rows = []
    for step in range(spec["warmup"] + spec["steps"]):  # the shared order, laid out for a sequential sampler
        for i in step_ids(step, spec["batch"], len(records)):
            r = records[i]
            best, worst = (0, 1) if r.scores[0] > r.scores[1] else (1, 0)
            rows.append({"prompt": r.prompt, "chosen": r.responses[best], "rejected": r.responses[worst]})
    args = RewardConfig(output_dir=spec["tmp"] + "/trl", per_device_train_batch_size=spec["micro"],
                        gradient_accumulation_steps=spec["batch"] // spec["micro"],
                        max_steps=spec["warmup"] + spec["steps"], learning_rate=LR, lr_scheduler_type="constant",
                        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=spec["precision"] == "bf16",
                        fp16=False, gradient_checkpointing=checkpointing, max_length=spec["max_length"],
                        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    stamps: list[tuple[float, float]] = []
    prof: list[Any] = []
    profiled: dict[str, Any] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            stamps.append((time.perf_counter(), time.process_time()))
            if len(stamps) == spec["warmup"]:
                prof.append(start_profile(spec))
            elif len(stamps) == spec["warmup"] + spec["steps"]:
                profiled.update(stop_profile(prof[0]))

    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            callbacks=[Clock()])
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    kept = len(trainer.train_dataset)
    if kept != len(rows):
        raise SystemExit(f"TRL dropped {len(rows) - kept} pairs longer than max_length")
    trainer.train()
    w = spec["warmup"]
    (t0, c0), (t1, c1) = stamps[w - 1], stamps[w + spec["steps"] - 1]
    return {"seconds": t1 - t0, "cpu_seconds": c1 - c0, "pairs": spec["steps"] * spec["batch"], **profiled}


def worker_original(spec: dict[str, Any], imitation_weight: float, pad_to_max: bool) -> dict[str, Any]:
    """The original DSP code's computation (Linear95/DSP: model.py, trainer.py,
    reward_datasets.py), rewritten on the same model: rows = bos + prompt + response + eos,
    lm_logits = lm_head(hidden) for every row and position, ranking loss, then the LM loss (per
    row mean NLL over the attention mask, averaged over rows scored above 0.85) added with its
    weight. As shipped (scripts/train.sh): one pair per micro-batch, each pair padded to its
    longer row, gradients accumulated over the batch. pad_to_max: all pairs in one micro-batch,
    every row padded to max_length."""
    import torch
    import torch.nn.functional as F
    from transformers.utils import logging as hf_logging

    from rmkit.data.collate import encode_record
    from rmkit.data.records import read_records
    from rmkit.model import RewardModel
    from rmkit.tokenizer import load_tokenizer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    tok = load_tokenizer(spec["model"])
    pad = tok.pad_token_id
    model = RewardModel.from_pretrained(spec["model"], pooling="eos").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    records = read_records(Path(spec["data"]))
    max_length = spec["max_length"]

    def rows_of(recs: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        encs = [encode_record(r, tok, max_length, "left", append_eos=True) for r in recs]
        width = max_length if pad_to_max else max(max(e.row_lengths()) for e in encs)
        ids = torch.full((2 * len(recs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scores = torch.zeros(2 * len(recs))
        for i, (r, enc) in enumerate(zip(recs, encs)):
            best = 0 if r.scores[0] > r.scores[1] else 1
            for j, resp in enumerate((enc.response_ids[best], enc.response_ids[1 - best])):
                row = enc.prompt_ids + resp
                ids[2 * i + j, :len(row)] = torch.tensor(row)
                mask[2 * i + j, :len(row)] = 1
                scores[2 * i + j] = 1.0 if j == 0 else 0.0
        return ids, mask, scores

    def micro(recs: list[Any], scale: float) -> None:
        ids, mask, scores = rows_of(recs)
        with autocast(spec["precision"]):
            hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            lm_logits = model.lm_head(hidden)  # [rows, length, vocab], whatever the LM weight
            last = mask.sum(1) - 1
            rewards = model.score(hidden[torch.arange(ids.shape[0]), last]).squeeze(-1).float()
        rank = -F.logsigmoid(rewards[0::2] - rewards[1::2]).mean()
        vocab = lm_logits.shape[-1]
        per_token = F.cross_entropy(lm_logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1),
                                    reduction="none").view(ids.shape[0], -1)
        m = mask[:, 1:].float()
        per_row = (per_token * m).sum(-1) / m.sum(-1)
        keep = (scores > 0.85).float()
        lm = (per_row * keep).sum() / (keep.sum() + 1e-7)
        ((rank + imitation_weight * lm) * scale).backward()

    def step(k: int) -> None:
        recs = [records[i] for i in step_ids(k, spec["batch"], len(records))]
        if pad_to_max:
            micro(recs, 1.0)
        else:
            for r in recs:
                micro([r], 1.0 / len(recs))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for k in range(spec["warmup"]):
        step(k)
    prof = start_profile(spec)
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        step(k)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "pairs": spec["steps"] * spec["batch"], **stop_profile(prof)}


PROFILE_COLUMNS = ("mode", "self CPU s/step", *(name for name, _ in PROFILE_GROUPS), "the rest", "largest of the rest",
                   "matmul GFLOP/s")


def profile_rows(runs: dict[str, list[dict[str, Any]]], steps: int,
                 linear_flops: Any = None) -> list[list[str]]:
    """A row per profiled mode: its self CPU time per step, each group's share of it, and the rate
    its matmul operators ran at (`linear_flops(run, mode)`: the FLOPs of its weight matmuls, over
    their self time; the attention scores run in the attention kernel), set against the 1024^3
    probe's."""
    rows = []
    for mode, rs in runs.items():
        run = next((r for r in rs if r.get("profile")), None)
        if run is None:
            continue
        ops = run["profile"]
        total = sum(o[2] for o in ops) or 1.0
        share = {name: 0.0 for name in (*(n for n, _ in PROFILE_GROUPS), "the rest")}
        groups = [profile_group(key) for key, _, _ in ops]
        for group, (_, _, sec) in zip(groups, ops):
            share[group] += sec
        rest = [o for o, group in zip(ops, groups) if group == "the rest"][:3]
        rate = f"{linear_flops(run, mode) / share['matmuls'] / 1e9:.0f}" if linear_flops and share["matmuls"] else ""
        rows.append([mode, f"{total / steps:.2f}", *(f"{100 * v / total:.0f}%" for v in share.values()),
                     ", ".join(f"{k} {100 * sec / total:.0f}%" for k, _, sec in rest), rate])
    return rows


MEMORY_COLUMNS = ("mode", "peak RSS MB", "weights, grads, AdamW MB", "activations MB", "positions",
                  "KB per position", "the rest MB")


def memory_rows(runs: dict[str, list[dict[str, Any]]], state: float) -> list[list[str]]:
    """A row per mode with a saved-tensor tally: its peak RSS split into the training state
    (`state` MB, the same in every mode), the largest micro-batch's activations, and the rest
    (libraries, the allocator's kept blocks, transients such as gradients being summed)."""
    rows = []
    for mode, rs in runs.items():
        run = next((r for r in rs if "saved_mb" in r), None)
        if run is None:
            continue
        saved, positions, peak = run["saved_mb"], run["saved_positions"], run["peak_rss_mb"]
        per = f"{saved * 1024 / positions:.0f}" if positions else ""
        rows.append([mode, f"{peak:.0f}", f"{state:.0f}", f"{saved:.0f}", f"{positions}", per,
                     f"{peak - state - saved:.0f}"])
    return rows


def split_mode(mode: str) -> tuple[str, int | None]:
    """'crft/rmkit@1' -> ('crft/rmkit', 1): an rmkit or TRL mode at its own micro-batch (records per
    micro-batch), so one run can set micro-batch sizes side by side; no '@': (mode, None); a
    non-numeric '@...' stays in the name, which then matches no mode."""
    base, at, micro = mode.partition("@")
    if at and not micro.isdigit():
        return mode, None
    return base, int(micro) if at else None


def run_worker(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    stage, impl = split_mode(mode)[0].split("/")
    weight = spec["imitation_weight"] if stage == "crft" else 0.0
    tally = SavedTally()
    with track_saved(tally) if spec.get("memory") else contextlib.nullcontext():
        if impl in ("rmkit", "rmkit-packed"):
            res = worker_rmkit(dict(spec, packed_rule=impl == "rmkit-packed"), weight)
        elif impl.startswith("trl"):
            res = worker_trl(spec, checkpointing=impl == "trl-gc")
        else:
            res = worker_original(spec, weight, pad_to_max=impl == "padmax")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec.get("memory"):
        res.update(tally.largest())
    return res


# ---- the machine ----------------------------------------------------------------------------------

def hardware() -> str:
    from rmkit.hardware import cpu_flags

    model, cores = platform.processor() or "unknown CPU", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    flags = cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}, {cores} cores, flags: {' '.join(simd) or 'none of avx2/avx512/amx'}"


def matmul_rate(dtype_name: str, threads: int, n: int = 1024, reps: int = 3) -> float:
    """The best of `reps` n^3 matmuls, in FLOP/s (2 n^3 each): the roofline's compute ceiling
    (1024^3 is already at the plateau on a CPU, and emulated bf16 (no AMX or avx512_bf16) needs seconds per call)."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def model_shape(model_dir: Path) -> dict[str, float]:
    """N (decoder matmul parameters), n_layer, d, V: what the FLOP count needs."""
    config = json.loads((model_dir / "config.json").read_text())
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", d // heads)
    ffn = config["intermediate_size"]
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * ffn
    return {"N": float(per_layer * layers), "layers": float(layers), "d": float(d), "V": float(config["vocab_size"])}


def weight_flops(res: dict[str, Any], mode: str, shape: dict[str, float]) -> float:
    """FLOPs of the weight matmuls: 6 N per position, plus 6 V d per position through the LM head
    (every position in the original code and its pad-to-max variant, the imitation targets in rmkit)."""
    lm_all = split_mode(mode)[0].split("/")[1] in ("original", "padmax")
    head = res["positions"] if lm_all else res.get("lm_positions", 0.0)
    return 6 * shape["N"] * res["positions"] + 6 * shape["V"] * shape["d"] * head


def flops(res: dict[str, Any], mode: str, shape: dict[str, float]) -> float:
    """Matmul FLOPs executed: the weight matmuls, plus 12 n_layer d T per position of a T-long row
    (sum of T^2 over rows) for the attention scores."""
    return weight_flops(res, mode, shape) + 12 * shape["layers"] * shape["d"] * res["square"]


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("torch", "transformers", "deepspeed", "trl"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


# ---- the driver -----------------------------------------------------------------------------------

def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in name or model folder")
    p.add_argument("--pairs", type=int, default=32, help="data slice: pairs per stage")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--micro", type=int, default=None,
                   help="rmkit: records per micro-batch (default: what recipes/cpu/{grft,crft}.yaml ship; on a "
                        "CPU the speed barely depends on it, the memory does)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default: one pass over the pairs, less the warmup steps)")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every mode, order rotated")
    p.add_argument("--imitation-weight", type=float, default=1.0, help="CRFT's LM loss weight")
    p.add_argument("--domain", default="business", help="DSP domain for CRFT")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}; an rmkit or TRL "
                        "mode as MODE@N runs at micro-batch N records (e.g. crft/rmkit@1,grft/trl@1)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="every mode's precision (auto: what rmkit picks on this machine)")
    p.add_argument("--no-prefix-sharing", action="store_true", help="rmkit modes without prefix sharing")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="rmkit modes recompute every N-th decoder layer in backward (train.gradient_checkpointing: N; "
                        "0 = off, the default): memory for compute")
    p.add_argument("--compile", action="store_true",
                   help="rmkit modes with torch.compile(dynamic=True) on the decoder (an experiment; rmkit does not compile)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler around each mode's timed steps: where the time goes (adds its overhead)")
    p.add_argument("--memory", action="store_true",
                   help="tally what autograd saves for backward in each micro-batch and print where the peak RSS "
                        "goes: weights, gradients and AdamW states; the largest micro-batch's activations; the rest")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"), help="append results here ('' = don't)")
    p.add_argument("--note", default="", help="a line to write with the results (e.g. 'preliminary')")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (TRL's step clock starts at the end of a step)")

    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        res = run_worker(args.worker, spec)
        Path(spec["result"]).write_text(json.dumps(res))
        return

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from rmkit.data.collate import encode_record
    from rmkit.data.records import write_records
    from rmkit.hardware import resolve_precision
    from rmkit.models import resolve_model

    console = Console(width=160)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m, (base, micro) in ((m, split_mode(m)) for m in modes)
               if base not in MODES or (micro is not None and base.split("/")[1] not in MICRO_MODES)]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {', '.join(MODES)} (rmkit and TRL modes also as "
                         f"MODE@N: micro-batch N records)")
    default_micro = {st: args.micro if args.micro is not None else recipe_micro(st) for st in ("grft", "crft")}

    def micro_of(m: str) -> int:
        """Records per micro-batch: MODE@N; else rmkit's recipe, TRL's whole batch (its own default)."""
        base, micro = split_mode(m)
        if micro is not None:
            return micro
        return args.batch if base.split("/")[1].startswith("trl") else default_micro[base.split("/")[0]]

    for m in modes:
        micro = micro_of(m)
        if micro < 1:
            p.error(f"{m}: a micro-batch holds at least 1 record, not {micro}")
        if args.batch % micro:
            p.error(f"{m}: --batch {args.batch} is not a multiple of its micro-batch {micro}")
    precision, why = resolve_precision(args.precision, on_gpu=False)
    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    shape = model_shape(model)
    steps = args.steps or max(1, args.pairs // args.batch - args.warmup)
    load = os.getloadavg()[0]
    rate = {name: matmul_rate(name, args.threads) for name in ("fp32", "bf16")}
    console.print(f"matmul rate (1024^3, {args.threads} threads): fp32 {rate['fp32'] / 1e9:.1f} GFLOP/s, "
                  f"bf16 {rate['bf16'] / 1e9:.1f} GFLOP/s; precision {precision} ({why})")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rmkit-bench-") as tmp:
        data: dict[str, Path] = {}
        encoded: dict[str, list[Any]] = {}
        for stage in sorted({m.split("/")[0] for m in modes}):
            recs = select_pairs(stage, tok, args.pairs, args.max_length, args.domain)
            data[stage] = Path(tmp) / f"{stage}.jsonl"
            write_records(data[stage], recs)
            encoded[stage] = [encode_record(r, tok, args.max_length, "left", append_eos=True) for r in recs]
        for rep in range(args.reps):
            for mode in modes[rep % len(modes):] + modes[:rep % len(modes)]:
                stage = mode.split("/")[0]
                spec = {"model": str(model), "data": str(data[stage]), "max_length": args.max_length,
                        "batch": args.batch, "micro": micro_of(mode), "warmup": args.warmup, "steps": steps,
                        "threads": args.threads, "imitation_weight": args.imitation_weight,
                        "prefix_sharing": not args.no_prefix_sharing, "compile": args.compile, "profile": args.profile,
                        "memory": args.memory, "checkpoint_every": args.checkpoint_every,
                        "precision": precision, "tmp": tempfile.mkdtemp(dir=tmp),
                        "result": str(Path(tmp) / f"{mode.replace('/', '-')}-{rep}.json")}
                spec_path = Path(spec["tmp"]) / "spec.json"
                spec_path.write_text(json.dumps(spec))
                console.print(f"[bold]{mode}[/] (rep {rep + 1}/{args.reps}): {args.warmup} warmup + {steps} timed "
                              f"steps of {args.batch} pairs ...")
                proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--spec", str(spec_path)],
                                      capture_output=True, text=True, timeout=args.timeout,
                                      env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
                if proc.returncode != 0:
                    how = (f"killed by signal {-proc.returncode} (SIGKILL is usually the kernel's OOM killer: "
                           f"check `free -g` and /dev/shm)" if proc.returncode < 0 else f"exit code {proc.returncode}")
                    console.print(f"[red]{mode} failed: {how}[/]\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                    failed.append(mode)
                    continue
                res = json.loads(Path(spec["result"]).read_text())
                counts = work(mode, encoded[stage], spec)
                for k, v in counts.items():
                    res.setdefault(k, v)
                res["distinct"] = counts["distinct"]
                runs[mode].append(res)

    columns = ("mode", "pairs/s median [min, max]", "CPU s/step", "peak RSS MB", "computed/distinct", "MFU",
               "vs", "speed", "CPU-time speed", "peak memory")
    table = Table(title=f"training throughput: {args.model}, {args.pairs} pairs, max length {args.max_length}, "
                        f"batch {args.batch}, {steps} timed steps, {precision}, {args.reps} reps")
    for col in columns:
        table.add_column(col, justify="left" if col in ("mode", "vs") else "right")
    summary: dict[str, dict[str, float]] = {}
    for mode, rs in runs.items():
        if not rs:
            continue
        med = lambda key, rs=rs: statistics.median(r[key] for r in rs)  # noqa: E731
        mfu = statistics.median(flops(r, mode, shape) / r["seconds"] for r in rs) / rate[precision]
        summary[mode] = {"pairs_per_s": statistics.median(r["pairs"] / r["seconds"] for r in rs),
                         "pairs_per_cpu_s": statistics.median(r["pairs"] / r["cpu_seconds"] for r in rs),
                         "peak_rss_mb": med("peak_rss_mb"), "cpu_per_step": med("cpu_seconds") / steps,
                         "ratio": med("positions") / med("distinct"), "mfu": mfu,
                         "spread": spread([r["pairs"] / r["seconds"] for r in rs])}
    md_rows = []
    for mode, s in summary.items():
        # against the fastest run of the baseline mode at any micro-batch (grft/trl or grft/trl@N)
        candidates = [m for m in summary if split_mode(m)[0] == BASELINE.get(split_mode(mode)[0], "")]
        base_mode = max(candidates, key=lambda m: summary[m]["pairs_per_s"], default="")
        base = summary.get(base_mode)
        ratios = ["", "", ""]
        if base:
            ratios = [f"{s['pairs_per_s'] / base['pairs_per_s']:.2f}x",
                      f"{s['pairs_per_cpu_s'] / base['pairs_per_cpu_s']:.2f}x",
                      f"{s['peak_rss_mb'] / base['peak_rss_mb']:.2f}x"]
        cells = [mode, s["spread"], f"{s['cpu_per_step']:.2f}", f"{s['peak_rss_mb']:.0f}", f"{s['ratio']:.2f}",
                 f"{100 * s['mfu']:.0f}%", base_mode if base else "", *ratios]
        table.add_row(*cells)
        md_rows.append("| " + " | ".join(cells) + " |")
    console.print(table)
    prof_rows = profile_rows(runs, steps, lambda r, m: weight_flops(r, m, shape))
    if prof_rows:
        ptable = Table(title="where the time goes (torch.profiler, self CPU time of the timed steps, first repetition)")
        for col in PROFILE_COLUMNS:
            ptable.add_column(col, justify="left" if col in ("mode", "largest of the rest") else "right")
        for cells in prof_rows:
            ptable.add_row(*cells)
        console.print(ptable)
    mem_rows = memory_rows(runs, state_mb(model)) if args.memory else []
    if mem_rows:
        mtable = Table(title="where the peak memory goes (first repetition)")
        for col in MEMORY_COLUMNS:
            mtable.add_column(col, justify="left" if col == "mode" else "right")
        for cells in mem_rows:
            mtable.add_row(*cells)
        console.print(mtable)
    if failed:
        console.print(f"[red]not written to {args.docs or 'docs'}: {', '.join(sorted(set(failed)))} failed[/]")
        sys.exit(1)
    if args.docs:
        cmd = "python bench/throughput.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        lines = [
            f"\n### {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — {args.model}, same records in the same order",
            "",
            f"- command: `{cmd.strip()}`",
            f"- data: HH helpful (GRFT) and DSP {args.domain} pairs (CRFT), {args.pairs} pairs each, max length "
            f"{args.max_length}; batch {args.batch} pairs (rmkit micro-batch "
            f"GRFT {default_micro['grft']}, CRFT {default_micro['crft']} records unless a mode says @N), {args.warmup} "
            f"warmup + {steps} timed steps, {args.reps} repetitions (median [min, max]); imitation weight "
            f"{args.imitation_weight} (CRFT)" + (f"; rmkit recomputes every {args.checkpoint_every}-th decoder layer in backward"
                                                 if args.checkpoint_every else ""),
            f"- precision {precision}: {why}",
            f"- hardware: {hardware()}; matmul rate fp32 {rate['fp32'] / 1e9:.1f} GFLOP/s, bf16 "
            f"{rate['bf16'] / 1e9:.1f} GFLOP/s; 1-minute load average at start {load:.1f}",
            f"- model FLOPs: N = {shape['N'] / 1e6:.1f}M decoder matmul parameters, {int(shape['layers'])} layers, "
            f"d {int(shape['d'])}, V {int(shape['V'])}",
            f"- versions: {versions()}",
        ]
        if args.note:
            lines.append(f"- note: {args.note}")
        lines += ["", "| " + " | ".join(columns) + " |",
                  "|---|" + "---:|" * 5 + "---|" + "---:|" * 3, *md_rows, ""]
        if prof_rows:
            lines += ["Where the time goes (torch.profiler around the timed steps of the first repetition, self CPU "
                      "time; the profiler's overhead is in this run's timings):", "",
                      "| " + " | ".join(PROFILE_COLUMNS) + " |", "|---|" + "---:|" * (len(PROFILE_COLUMNS) - 3) + "---|---:|",
                      *("| " + " | ".join(c) + " |" for c in prof_rows), ""]
        if mem_rows:
            lines += ["Where the peak memory goes (first repetition; activations = what autograd saved for backward in "
                      "the micro-batch that saved the most, parameters excluded):", "",
                      "| " + " | ".join(MEMORY_COLUMNS) + " |", "|---|" + "---:|" * (len(MEMORY_COLUMNS) - 1),
                      *("| " + " | ".join(c) + " |" for c in mem_rows), ""]
        docs = Path(args.docs)
        docs.parent.mkdir(parents=True, exist_ok=True)
        with open(docs, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        console.print(f"appended to {docs}")


if __name__ == "__main__":
    main()
