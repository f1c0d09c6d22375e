"""Training throughput: rmkit vs TRL's RewardTrainer vs the original DSP implementation's cost.

    python bench/throughput.py                      # smollm2-135m, 32 pairs, max length 256, batch 8
    python bench/throughput.py --pairs 8 --batch 4  # a short run

Every mode trains the same model from the same weights on the same pairs (the first --pairs HH
helpful pairs, and DSP pairs of --domain for CRFT, whose rows all fit --max-length, so no mode
truncates or drops anything), `--batch` pairs per optimizer step, fp32, no gradient
checkpointing, AdamW, grad clip 1.0. Each mode runs in a fresh subprocess (so peak RSS is its
own): --warmup untimed steps, then --steps timed steps (default: one pass over the pairs in
all; about 8 minutes for the five modes on an idle 2-core CPU).

  grft/rmkit      the real `Runner.train_step` (RewardModel + losses + DeepSpeed ZeRO-0 engine,
                  world size 1, in-process): prefix sharing chosen per micro-batch, eos pooling
  grft/trl        trl.RewardTrainer (chosen/rejected concatenated in one forward, dynamic padding,
                  EOS appended: the same tokens as rmkit's eos pooling)
  grft/reference  the original DSP code's cost: rows padded to max_length, no prefix sharing, full
                  [rows, length, vocab] LM logits and per-token cross-entropy for every row
                  although the LM weight is 0 (plain torch AdamW)
  crft/rmkit      Runner.train_step with the imitation loss on (target `whole`, the paper's)
  crft/reference  as grft/reference with the LM loss weighted in

pairs/s counts preference pairs trained per second; tokens/s counts the tokens of those pairs
(prompt + response + eos, each row), the same count for every mode, so the two ratios agree.
CPU s/step is the process's CPU time (all threads): on a shared machine it moves far less with
other people's load than wall time, so the table gives the speed ratio both ways.
Results print as a table and are appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = Path(os.environ.get("RMKIT_DATA", REPO.parent / "shared" / "data"))
MODES = ("grft/rmkit", "grft/trl", "grft/reference", "crft/rmkit", "crft/reference")
COLUMNS = ("mode", "pairs/s", "tokens/s", "s/step", "CPU s/step", "peak RSS MB", "vs", "speed (wall)",
           "speed (CPU time)", "peak memory")
LR = 1e-5


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


def pair_tokens(records: list[Any], tokenizer: Any, max_length: int) -> list[int]:
    from rmkit.data.collate import encode_record

    return [sum(encode_record(r, tokenizer, max_length, "left", append_eos=True).row_lengths()) for r in records]


# ---- workers: one mode each, in its own process ----------------------------------------------------

def worker_rmkit(spec: dict[str, Any], imitation_weight: float) -> dict[str, Any]:
    from rmkit.recipe import Recipe
    from rmkit.train.launch import free_port
    from rmkit.train.rundir import plan_run, write_run_dir

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    recipe = Recipe.model_validate({
        # stage grft with an imitation weight runs exactly CRFT's loss, without CRFT's
        # parent-checkpoint check (the bench starts every mode from the same base model)
        "stage": "grft", "model": {"path": spec["model"], "pooling": "eos"},
        "data": {"train": [{"path": spec["data"], "format": "canonical"}], "max_length": spec["max_length"],
                 "padding_side": "right", "prefix_sharing": spec["prefix_sharing"]},
        "loss": {"imitation_weight": imitation_weight, "imitation_target": "whole"},
        "train": {"lr": LR, "schedule": "constant", "global_batch": spec["batch"], "micro_batch": spec["batch"],
                  "max_steps": spec["warmup"] + spec["steps"], "seed": 0, "output_dir": spec["tmp"] + "/run"},
        "launch": {"deepspeed": "zero0", "gpus": 1, "precision": "fp32"},
    })
    plan = plan_run(recipe)
    write_run_dir(recipe, plan)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from rmkit.train.loop import Runner

    runner = Runner(plan.run_dir, resume=False)
    import torch

    torch.set_num_threads(spec["threads"])  # the Runner takes all cores; every mode gets the same
    runner.build()
    runner.engine.train()
    if spec.get("compile"):
        runner.model.base_model.compile(dynamic=True)  # in place: parameter names unchanged
    for step in range(spec["warmup"]):
        runner.train_step(step)
    t0, c0 = time.perf_counter(), time.process_time()
    pairs = 0
    for step in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        pairs += runner.train_step(step)["pairs"]
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "pairs": pairs}


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    from rmkit.data.records import read_records

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.config.pad_token_id = tok.pad_token_id
    rows = []
    for r in read_records(Path(spec["data"])):
        best, worst = (0, 1) if r.scores[0] > r.scores[1] else (1, 0)
        rows.append({"prompt": r.prompt, "chosen": r.responses[best], "rejected": r.responses[worst]})
    args = RewardConfig(output_dir=spec["tmp"] + "/trl", per_device_train_batch_size=spec["batch"],
                        max_steps=spec["warmup"] + spec["steps"], learning_rate=LR, lr_scheduler_type="constant",
                        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False,
                        gradient_checkpointing=False, max_length=spec["max_length"], logging_steps=10**6,
                        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                        disable_tqdm=True)
    stamps: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            stamps.append((time.perf_counter(), time.process_time()))

    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            callbacks=[Clock()])
    kept = len(trainer.train_dataset)
    if kept != len(rows):
        raise SystemExit(f"TRL dropped {len(rows) - kept} pairs longer than max_length")
    trainer.train()
    w = spec["warmup"]
    (t0, c0), (t1, c1) = stamps[w - 1], stamps[w + spec["steps"] - 1]
    return {"seconds": t1 - t0, "cpu_seconds": c1 - c0, "pairs": spec["steps"] * spec["batch"]}


def worker_reference(spec: dict[str, Any], imitation_weight: float) -> dict[str, Any]:
    """The cost model of the original DSP code (Linear95/DSP: model.py, trainer.py,
    reward_datasets.py), rewritten: every row padded to max_length (its collator pads to
    model_max_length whenever the batch has more than one record), lm_logits = lm_head(hidden)
    for every row and position, the LM loss = per-token cross-entropy over all of them, masked
    to the preferred rows afterwards, added with its weight (0 in GRFT: still computed)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from rmkit.data.collate import encode_record
    from rmkit.data.records import read_records
    from rmkit.model import RewardModel

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = RewardModel.from_pretrained(spec["model"], pooling="eos").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    records = read_records(Path(spec["data"]))
    length = spec["max_length"]

    def rows_of(recs: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.full((2 * len(recs), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        scores = torch.zeros(2 * len(recs))
        for i, r in enumerate(recs):
            enc = encode_record(r, tok, length, "left", append_eos=True)
            best = 0 if r.scores[0] > r.scores[1] else 1
            for j, resp in enumerate((enc.response_ids[best], enc.response_ids[1 - best])):
                row = enc.prompt_ids + resp
                ids[2 * i + j, :len(row)] = torch.tensor(row)
                mask[2 * i + j, :len(row)] = 1
                scores[2 * i + j] = 1.0 if j == 0 else 0.0
        return ids, mask, scores

    def step(k: int) -> None:
        n = spec["batch"]
        recs = [records[(k * n + i) % len(records)] for i in range(n)]
        ids, mask, scores = rows_of(recs)
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        lm_logits = model.lm_head(hidden)  # [rows, length, vocab], whatever the LM weight
        last = mask.sum(1) - 1
        rewards = model.score(hidden[torch.arange(ids.shape[0]), last]).squeeze(-1)
        rank = -F.logsigmoid(rewards[0::2] - rewards[1::2]).mean()
        vocab = lm_logits.shape[-1]
        per_token = F.cross_entropy(lm_logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1),
                                    reduction="none").view(ids.shape[0], -1)
        m = mask[:, 1:].float()
        per_row = (per_token * m).sum(-1) / m.sum(-1)
        keep = (scores > 0.9).float()
        lm = (per_row * keep).sum() / (keep.sum() + 1e-7)
        loss = rank + imitation_weight * lm
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for k in range(spec["warmup"]):
        step(k)
    t0, c0 = time.perf_counter(), time.process_time()
    for k in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        step(k)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "pairs": spec["steps"] * spec["batch"]}


def run_worker(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    stage, impl = mode.split("/")
    weight = spec["imitation_weight"] if stage == "crft" else 0.0
    if impl == "rmkit":
        res = worker_rmkit(spec, weight)
    elif impl == "trl":
        res = worker_trl(spec)
    else:
        res = worker_reference(spec, weight)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


# ---- the driver -----------------------------------------------------------------------------------

def hardware() -> str:
    model, cores = platform.processor() or "unknown CPU", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model}, {cores} cores"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("torch", "transformers", "deepspeed", "trl"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in name or model folder")
    p.add_argument("--pairs", type=int, default=32, help="data slice: pairs per stage")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (one micro-batch)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default: one pass over the pairs, less the warmup steps)")
    p.add_argument("--imitation-weight", type=float, default=1.0, help="CRFT's LM loss weight")
    p.add_argument("--domain", default="business", help="DSP domain for CRFT")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--no-prefix-sharing", action="store_true", help="rmkit modes without prefix sharing")
    p.add_argument("--compile", action="store_true",
                   help="rmkit modes with torch.compile(dynamic=True) on the decoder (an experiment; rmkit does not compile)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per mode")
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

    from rmkit.data.records import write_records
    from rmkit.models import resolve_model

    console = Console(width=150)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    steps = args.steps or max(1, args.pairs // args.batch - args.warmup)
    load = os.getloadavg()[0]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rmkit-bench-") as tmp:
        data: dict[str, Path] = {}
        mean_tokens: dict[str, float] = {}
        for stage in sorted({m.split("/")[0] for m in modes}):
            recs = select_pairs(stage, tok, args.pairs, args.max_length, args.domain)
            data[stage] = Path(tmp) / f"{stage}.jsonl"
            write_records(data[stage], recs)
            toks = pair_tokens(recs, tok, args.max_length)
            mean_tokens[stage] = sum(toks) / len(toks)
        for mode in modes:
            stage = mode.split("/")[0]
            spec = {"model": str(model), "data": str(data[stage]), "max_length": args.max_length,
                    "batch": args.batch, "warmup": args.warmup, "steps": steps, "threads": args.threads,
                    "imitation_weight": args.imitation_weight, "prefix_sharing": not args.no_prefix_sharing,
                    "compile": args.compile,
                    "tmp": tempfile.mkdtemp(dir=tmp), "result": str(Path(tmp) / f"{mode.replace('/', '-')}.json")}
            spec_path = Path(spec["tmp"]) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            console.print(f"[bold]{mode}[/]: {args.warmup} warmup + {steps} timed steps of {args.batch} pairs ...")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--spec", str(spec_path)],
                                  capture_output=True, text=True, timeout=args.timeout,
                                  env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            if proc.returncode != 0:
                how = (f"killed by signal {-proc.returncode} (SIGKILL is usually the kernel's OOM killer: "
                       f"check `free -g` and /dev/shm)" if proc.returncode < 0 else f"exit code {proc.returncode}")
                console.print(f"[red]{mode} failed: {how}[/]\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                continue
            res = json.loads(Path(spec["result"]).read_text())
            res["pairs_per_s"] = res["pairs"] / res["seconds"]
            res["pairs_per_cpu_s"] = res["pairs"] / res["cpu_seconds"]
            res["tokens_per_s"] = res["pairs_per_s"] * mean_tokens[stage]
            res["wall"] = time.perf_counter() - t0
            results[mode] = res

    baseline = {"grft/rmkit": "grft/trl", "grft/reference": "grft/trl", "crft/rmkit": "crft/reference"}
    table = Table(title=f"training throughput: {args.model}, {args.pairs} pairs, max length {args.max_length}, "
                        f"batch {args.batch}, {steps} timed steps")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("mode", "vs") else "right")
    md_rows = []
    for mode, res in results.items():
        base = results.get(baseline.get(mode, ""))
        ratios = ["", "", ""]
        if base:
            ratios = [f"{res['pairs_per_s'] / base['pairs_per_s']:.2f}x",
                      f"{res['pairs_per_cpu_s'] / base['pairs_per_cpu_s']:.2f}x",
                      f"{res['peak_rss_mb'] / base['peak_rss_mb']:.2f}x"]
        cells = [mode, f"{res['pairs_per_s']:.3f}", f"{res['tokens_per_s']:.1f}", f"{res['seconds'] / steps:.2f}",
                 f"{res['cpu_seconds'] / steps:.2f}", f"{res['peak_rss_mb']:.0f}", baseline.get(mode, "") if base else "",
                 *ratios]
        table.add_row(*cells)
        md_rows.append("| " + " | ".join(cells) + " |")
    console.print(table)

    failed = [m for m in modes if m not in results]
    if failed:
        console.print(f"[red]not written to {args.docs or 'docs'}: {', '.join(failed)} failed[/]")
        sys.exit(1)
    if args.docs:
        cmd = "python bench/throughput.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        lines = [
            f"\n### {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — {args.model}",
            "",
            f"- command: `{cmd.strip()}`",
            f"- model: {args.model} ({model.name}); data: HH helpful (GRFT) and DSP {args.domain} pairs (CRFT), "
            f"{args.pairs} pairs each, max length {args.max_length}, batch {args.batch} pairs, {args.warmup} warmup + "
            f"{steps} timed steps, fp32, imitation weight {args.imitation_weight} (CRFT)",
            f"- hardware: {hardware()}; 1-minute load average at start {load:.1f}",
            f"- versions: {versions()}",
        ]
        if args.note:
            lines.append(f"- note: {args.note}")
        lines += ["", "| " + " | ".join(COLUMNS) + " |",
                  "|---|" + "---:|" * 5 + "---|" + "---:|" * 3, *md_rows, ""]
        docs = Path(args.docs)
        docs.parent.mkdir(parents=True, exist_ok=True)
        with open(docs, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        console.print(f"appended to {docs}")


if __name__ == "__main__":
    main()
