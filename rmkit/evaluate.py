"""`rmkit eval`'s figures: rewards for every record of every set, and what they add up to.

Each checkpoint (`rmkit.inspection`) is loaded by `rmkit.scorer` and scored on every set
(`rmkit.data.sources`) through `rmkit.score.score_shard`, the scorer training uses: no gradients,
batches grouped by length, one device->host transfer per set, records sharing a prompt scored
together with each distinct text once; bf16 on GPU, and on CPU what `launch.precision: auto`
picks. Accuracy, margins and group metrics come from `rmkit.score.tally`; every accuracy and the
length baseline get a prompt-bootstrap interval, and each checkpoint a paired difference with the
first one. Everything the user can get wrong (folders, recipe, data files) is checked before any
model is loaded, and the JSON report is written atomically at the very end: a bad input leaves
no file. The tables are drawn by the command (`rmkit.commands.eval`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rmkit import __version__
from rmkit.data.records import Record
from rmkit.data.sources import EvalSet, gather_sets
from rmkit.errors import RmkitError
from rmkit.inspection import inspect_checkpoint, short_labels
from rmkit.io import atomic_write_json
from rmkit.loss import pair_correct
from rmkit.scorer import Scorer, default_batch_size, default_device, load_scorer
from rmkit.stats import DEFAULT_RESAMPLES, DEFAULT_SEED

if TYPE_CHECKING:
    from rmkit.data.collate import EncodedRecord
    from rmkit.score import SetResult

PROGRESS_MIN_RECORDS = 64  # sets shorter than this finish before a bar is worth drawing
MIN_RESAMPLES = 100


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
    return [pair_correct(r[i], r[j]) for rec, r in zip(records, rewards) for i, j in rec.pairs()]


def length_outcomes(records: list[Record]) -> list[bool]:
    """Per pair: the better response is the longer one (in characters), as `tally` counts it."""
    return [len(rec.responses[i]) > len(rec.responses[j]) for rec in records for i, j in rec.pairs()]


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


def progress_bar() -> Any:
    """A transient bar on stderr, drawn only on a terminal (a log gets the result lines only)."""
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
    with progress_bar() as bar:
        for ckpt in checkpoints:
            t_load = time.perf_counter()
            scorer = load_scorer(ckpt, device, dtype, trust_remote_code)
            entry: dict[str, Any] = {"label": ckpt.name, "given": ckpt.label, "path": str(ckpt.path.resolve()),
                                     "kind": ckpt.kind, "loader": scorer.loader, "loader_reason": scorer.loader_reason,
                                     "meta": ckpt.meta, "encoding": ckpt.encoding.as_dict(),
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
