"""Pairs per second: `rmkit eval`'s scoring against a plain per-text Hugging Face loop.

Both sides score the same model on the same pairs, on the same device and dtype, and the same
token ids (like for like):
- rmkit: `rmkit.evaluate.score_records` (what `rmkit eval` runs: no grad, records sharing a
  prompt scored together with each distinct text once, batches grouped by length, one transfer
  per set, the shared prefix computed once);
- HF loop: `AutoModelForSequenceClassification`, one forward per text of every pair, on the ids
  rmkit's encoding gives that text (for a plain HF folder exactly `tokenizer(text)`; for an rmkit
  checkpoint prompt and response encoded apart, eos appended). A side whose rewards differ from
  the loop's by more than 1e-4 is not like for like, and its row is not reported.

Default: the built-in smollm2-135m converted to a reward folder with a random head (cached under
$RMKIT_CACHE/bench), the first 64 HH helpful pairs, max_length 256: seconds on a GPU, about three
minutes on a quiet 2-core CPU a repetition. rmkit is timed one row per response and with the shared
prefix (its default), the loop after them, `--reps` times (median [min, max]); every side counts
the token positions it computes, beside the floor: each distinct prompt and response once. Prints a rich table
and appends a section to docs/benchmarks.md:

  python bench/eval_throughput.py [--model NAME_OR_FOLDER] [--pairs 64] [--batch-size N] [--reps 3] [--precision fp32] [--profile]

Timings on a shared machine are noisy: run it on a quiet one for numbers you report.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from rmkit.checkpoint import META_FILE
from rmkit.data.readers import load_source
from rmkit.data.records import Record
from rmkit.evaluate import pair_outcomes, pair_prompts, score_records
from rmkit.inspection import inspect_checkpoint
from rmkit.io import atomic_dir
from rmkit.models import cache_dir, resolve_model
from rmkit.scorer import default_device, load_scorer

console = Console(highlight=False)


def reward_folder(name: str) -> Path:
    """A folder AutoModelForSequenceClassification loads: the model itself when it already is a
    reward folder or rmkit checkpoint, else its causal LM with a seeded random head (cached)."""
    import json

    path = resolve_model(name)
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    if (path / META_FILE).exists() or any(a.endswith("ForSequenceClassification") for a in archs):
        return path
    out = cache_dir() / "bench" / f"{path.name}-reward"
    if not (out / "config.json").exists():
        from transformers import AutoTokenizer

        from rmkit.model import RewardModel

        console.print(f"converting {path} to a reward folder with a random head -> {out}")
        tok = AutoTokenizer.from_pretrained(str(path))
        with atomic_dir(out) as tmp:
            RewardModel.from_pretrained(path, head_seed=0).save_pretrained(tmp, kind="reward", tokenizer=tok)
    return out


class Positions:
    """Counts the token positions a model computes (rows x padded length, over all forwards): on a
    CPU, where one text already keeps the cores busy, time follows this count."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.count += int(ids.numel())


def hf_model(folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The folder as users load it for a plain loop: AutoModelForSequenceClassification."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=dtype).to(device).eval()


def hf_loop(model: torch.nn.Module, encoded: list[Any], device: torch.device) -> tuple[float, list[list[float]], int]:
    """The straightforward way: one forward per text of every record, on the ids rmkit's
    encoding gives it (prompt ids + response ids)."""

    def one(ids: list[int]) -> float:
        t = torch.tensor([ids], device=device)
        return model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0, 0].item()

    with torch.no_grad():
        one(encoded[0].prompt_ids + encoded[0].response_ids[0])  # warm-up
        positions = Positions(model)
        t0 = time.perf_counter()
        rewards = [[one(e.prompt_ids + resp) for resp in e.response_ids] for e in encoded]
        seconds = time.perf_counter() - t0
    positions.handle.remove()
    return seconds, rewards, positions.count


def distinct_positions(encoded: list[Any]) -> int:
    """The physical floor of the work: every distinct prompt once and every distinct response of
    it once (`group_shared` over the whole set, no batch boundaries, no padding). The loop's
    positions over this bound the speed-up any layout reaches where time follows positions."""
    from rmkit.data.collate import group_shared, packed_length

    groups, _ = group_shared(encoded)
    return sum(packed_length(g) for g in groups)


def accuracy_cell(records: list[Record], rewards: list[list[float]]) -> str:
    """Pair accuracy with its 95% interval from `rmkit eval`'s bootstrap over prompts (the pairs of
    one prompt resampled together): the three scorers must agree on it, and it is a check of
    that, not a claim about the model."""
    import numpy as np

    from rmkit.stats import cluster_ids, clustered_bootstrap

    est = clustered_bootstrap(cluster_ids(pair_prompts(records)),
                              np.array(pair_outcomes(records, rewards), dtype=np.float64)).accuracy[0]
    return f"{est.value:.3f} [{est.lo:.3f}, {est.hi:.3f}]"


def rmkit_pass(scorer: Any, records: list[Record], batch_size: int, share: bool,
               profile: bool = False) -> tuple[float, list[Any], list[list[float]], int]:
    score_records(scorer, records[:2], batch_size, prefix_sharing=share)  # warm-up
    module = scorer.model if isinstance(scorer.model, torch.nn.Module) else scorer.model.model
    positions = Positions(module)
    with profiler(scorer.device) if profile else contextlib.nullcontext() as prof:
        t0 = time.perf_counter()
        encoded, rewards = score_records(scorer, records, batch_size, prefix_sharing=share)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    if prof is not None:
        print_profile(prof, scorer.device.type)
    positions.handle.remove()
    return seconds, encoded, rewards, positions.count


def profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
              "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention")


def print_profile(prof: Any, device: str) -> None:
    """Top operators by self time, and the share of time in matrix multiplies and attention."""
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events) or 1
    t = Table(title=f"rmkit eval profile (shared prefix), self {device.upper()} time")
    for col in ("operator", "calls", "self ms", "share"):
        t.add_column(col, justify="left" if col == "operator" else "right")
    for e in sorted(events, key=lambda e: -getattr(e, key))[:10]:
        t.add_row(e.key, str(e.count), f"{getattr(e, key) / 1000:.0f}", f"{getattr(e, key) / total:.1%}")
    console.print(t)
    mm = sum(getattr(e, key) for e in events if e.key in MATMUL_OPS and e.key not in ("aten::matmul", "aten::linear"))
    console.print(f"matrix multiplies and attention kernels: {mm / total:.1%} of self {device.upper()} time")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="built-in name, causal-LM folder, reward folder or rmkit checkpoint")
    ap.add_argument("--pairs", type=int, default=64, help="HH helpful pairs to score (default 64)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="records per forward on the rmkit side (default: rmkit eval's, 16 on a GPU, 1 on a CPU)")
    ap.add_argument("--data", default=os.path.join(os.environ.get("RMKIT_DATA", "../shared/data"), "helpful.json"),
                    help="PATH or PATH:DOMAIN (a DSP file as pairs of one domain)")
    ap.add_argument("--profile", action="store_true", help="profile the shared-prefix pass (torch.profiler)")
    ap.add_argument("--docs", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"),
                    help="append results here ('' = don't)")
    ap.add_argument("--note", default="", help="a line to write with the results")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, the scorers alternating (default 3)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto = what rmkit eval picks on this machine; rows are reported only where both sides agree to 1e-4, "
                         "which in practice needs fp32")
    args = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    load = os.getloadavg()[0]
    folder = reward_folder(args.model)
    path, _, domain = args.data.partition(":") if not os.path.exists(args.data) else (args.data, "", "")
    records = load_source(path, domain=domain or None).records[: args.pairs]
    pairs = sum(len(r.pairs()) for r in records)
    data_name = f"{Path(path).name}{':' + domain if domain else ''}"
    if args.precision != "auto":
        os.environ["RMKIT_PRECISION"] = args.precision  # the pin `rmkit eval` honours (rmkit.hardware)
    device, dtype = default_device()
    torch.manual_seed(0)

    scorer = load_scorer(inspect_checkpoint(folder, args.max_length), device, dtype)
    from rmkit.scorer import default_batch_size

    args.batch_size = args.batch_size or default_batch_size(device)
    packs = getattr(scorer.model, "supports_packing", True)
    model = hf_model(folder, device, dtype)
    names = ["hf", "rows"] + (["shared"] if packs else [])
    seconds: dict[str, list[float]] = {n: [] for n in names}
    out: dict[str, tuple[list[Any], list[list[float]], int]] = {}
    for rep in range(args.reps):  # the scorers alternate, so drift on the machine reaches them all
        for n in names[1:]:
            sec, enc, rew, pos = rmkit_pass(scorer, records, args.batch_size, share=n == "shared",
                                            profile=args.profile and n == "shared" and rep == 0)
            seconds[n].append(sec)
            out[n] = (enc, rew, pos)
        encoded = out[names[-1]][0]
        sec, theirs, hf_pos = hf_loop(model, encoded, device)
        seconds["hf"].append(sec)
    out["hf"] = (encoded, theirs, hf_pos)
    del scorer, model
    diff = max(abs(a - b) for n in names[1:] for ra, rb in zip(out[n][1], theirs) for a, b in zip(ra, rb))
    labels = {"hf": "HF loop, one text per forward",
              "rows": f"rmkit eval, one row per response (batch {args.batch_size})",
              "shared": f"rmkit eval, shared prefix (batch {args.batch_size}): the default"}
    if diff > 1e-4:
        console.print(f"[red]rmkit and the HF loop disagree by {diff:.2e} on the same ids: not like for like, "
                      f"rows not reported[/]")
        names = ["hf"]
    hf_s = statistics.median(seconds["hf"])

    runs_on = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    where = f"{device.type} ({runs_on}), {str(dtype).removeprefix('torch.')}"
    cols = ("scorer", "seconds", "pairs/s median [min, max]", "speed vs HF loop [min, max]",
            "positions computed", "positions vs HF loop", "accuracy [95% interval]")
    t = Table(title=f"eval throughput: {args.model}, {pairs} pairs of {data_name}, max_length {args.max_length}, "
                    f"{where}, {args.reps} repetitions")
    for col in cols:
        t.add_column(col, justify="left" if col == "scorer" else "right")
    md = []
    for n in names:
        secs, (enc, rew, pos) = seconds[n], out[n]
        sec = statistics.median(secs)
        ratios = [h / x for h, x in zip(seconds["hf"], secs)]  # per repetition
        cells = [labels[n], f"{sec:.2f}", f"{pairs / sec:.2f} [{pairs / max(secs):.2f}, {pairs / min(secs):.2f}]",
                 f"{hf_s / sec:.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]", str(pos), f"{pos / hf_pos:.2f}x",
                 accuracy_cell(records, rew)]
        t.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(t)
    floor = distinct_positions(encoded)
    bound = (f"the floor, each distinct prompt and response once: {floor} positions ({floor / hf_pos:.2f}x the loop's): "
             f"computing fewer positions saves at most {hf_pos / floor:.2f}x, the rest of a speed-up is cheaper "
             f"positions (fewer, fuller forwards)")
    console.print(f"max |reward difference| rmkit vs HF loop: {diff:.2e}; "
                  f"{sum(e.truncated for e in encoded)} of {len(records)} records truncated")
    console.print(bound)
    if args.docs:
        import datetime as dt
        import shlex
        import sys

        from throughput import hardware, versions

        cmd = "python bench/eval_throughput.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        lines = [f"\n### {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — eval, {args.model}", "",
                 f"- command: `{cmd.strip()}`",
                 f"- model: {args.model} ({folder.name}); data: the first {len(records)} records of {data_name} "
                 f"({pairs} pairs), max length {args.max_length}, {where}",
                 f"- hardware: {hardware()}; 1-minute load average at start {load:.1f}",
                 f"- versions: {versions()}",
                 f"- max reward difference rmkit vs HF loop: {diff:.2e}",
                 f"- {bound}"]
        if args.note:
            lines.append(f"- note: {args.note}")
        lines += ["", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1), *md, ""]
        with open(args.docs, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        console.print(f"appended to {args.docs}")


if __name__ == "__main__":
    main()
