"""Pairs per second: `rmkit eval`'s scoring against a plain per-text Hugging Face loop.

Both sides score the same model on the same pairs, on the same device and dtype:
- rmkit: `rmkit.evaluate.score_records` (what `rmkit eval` runs: no grad, batches grouped by
  length, one transfer per set; rmkit checkpoints also get its prefix sharing);
- HF loop: `AutoModelForSequenceClassification`, one `model(**tokenizer(text))` per response.

Default: the built-in smollm2-135m converted to a reward folder with a random head (cached under
$RMKIT_CACHE/bench), the first 64 HH helpful pairs, max_length 256: seconds on a GPU, about three
minutes on a quiet 2-core CPU. Prints a rich table and, last, one markdown row:

  python bench/eval_throughput.py [--model NAME_OR_FOLDER] [--pairs 64] [--batch-size 16]

Timings on a shared machine are noisy: run it on a quiet one for numbers you report.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rmkit.data.readers import load_source
from rmkit.data.records import Record
from rmkit.evaluate import default_device, inspect_checkpoint, load_scorer, score_records, set_result
from rmkit.io import atomic_dir
from rmkit.models import cache_dir, resolve_model

console = Console(highlight=False)


def reward_folder(name: str) -> Path:
    """A folder AutoModelForSequenceClassification loads: the model itself when it already is a
    reward folder or rmkit checkpoint, else its causal LM with a seeded random head (cached)."""
    import json

    path = resolve_model(name)
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    if (path / "meta.json").exists() or any(a.endswith("ForSequenceClassification") for a in archs):
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


def hf_loop(folder: Path, records: list[Record], max_length: int, device: torch.device,
            dtype: torch.dtype) -> tuple[float, list[list[float]]]:
    """The straightforward way: one forward per text, the tokenizer's own truncation (left)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=dtype).to(device).eval()

    def one(text: str) -> float:
        inputs = tok(text, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        return model(**inputs).logits[0, 0].item()

    with torch.no_grad():
        one(records[0].prompt + records[0].responses[0])  # warm-up
        t0 = time.perf_counter()
        rewards = [[one(r.prompt + resp) for resp in r.responses] for r in records]
        seconds = time.perf_counter() - t0
    del model
    return seconds, rewards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="built-in name, causal-LM folder, reward folder or rmkit checkpoint")
    ap.add_argument("--pairs", type=int, default=64, help="HH helpful pairs to score (default 64)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="records per forward on the rmkit side")
    ap.add_argument("--data", default=os.path.join(os.environ.get("RMKIT_DATA", "../shared/data"), "helpful.json"))
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    folder = reward_folder(args.model)
    records = load_source(args.data).records[: args.pairs]
    pairs = sum(len(r.pairs()) for r in records)
    device, dtype = default_device()
    torch.manual_seed(0)

    scorer = load_scorer(inspect_checkpoint(folder, args.max_length), device, dtype)
    score_records(scorer, records[:2], args.batch_size)  # warm-up
    t0 = time.perf_counter()
    encoded, ours = score_records(scorer, records, args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rm_s = time.perf_counter() - t0
    rm_acc = set_result(records, encoded, ours).accuracy
    del scorer

    hf_s, theirs = hf_loop(folder, records, args.max_length, device, dtype)
    hf_acc = set_result(records, encoded, theirs).accuracy
    diff = max(abs(a - b) for ra, rb in zip(ours, theirs) for a, b in zip(ra, rb))

    rm_rate, hf_rate = pairs / rm_s, pairs / hf_s
    where = f"{device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), {str(dtype).removeprefix('torch.')}"
    t = Table(title=f"eval throughput: {args.model}, {pairs} HH helpful pairs, max_length {args.max_length}, {where}")
    for col in ("scorer", "seconds", "pairs/s", "ratio", "accuracy"):
        t.add_column(col, justify="left" if col == "scorer" else "right")
    t.add_row("HF loop (one text per forward)", f"{hf_s:.2f}", f"{hf_rate:.2f}", "1.00x", f"{hf_acc:.3f}")
    t.add_row(f"rmkit eval (batch {args.batch_size})", f"{rm_s:.2f}", f"{rm_rate:.2f}", f"{rm_rate / hf_rate:.2f}x",
              f"{rm_acc:.3f}")
    console.print(t)
    console.print(f"max |reward difference| between the two: {diff:.2e}; "
                  f"{sum(e.truncated for e in encoded)} of {len(records)} records truncated")
    print(f"| {args.model} | {where} | {pairs} | {args.max_length} | {hf_rate:.2f} | {rm_rate:.2f} | "
          f"{rm_rate / hf_rate:.2f}x |")


if __name__ == "__main__":
    main()
