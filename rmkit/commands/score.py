"""`rmkit score CKPT --data rows.jsonl -o rewards.jsonl`: a reward for every {"prompt", "response"}
row of a JSONL file, written back beside the row, in input order.

The model is loaded and the texts encoded exactly as `rmkit eval` does (`rmkit.scorer`), so a
row's reward equals what eval, `rmkit serve` and `rmkit.load` give for the same text.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from rmkit.errors import RmkitError

ROW_HINT = 'each line: {"prompt": ..., "response": ...}'
HELP = (
    'A reward for every {"prompt", "response"} row of one JSONL file.\n\n'
    'Each row is written to -o with a "reward" field added, in input order (its other fields kept). '
    "CKPT is an rmkit checkpoint or any Hugging Face reward folder, loaded and encoded as `rmkit eval` "
    "does, so a reward equals what eval, `rmkit serve` and `rmkit.load` give for the same text.\n\n"
    "Example:\n\n"
    "rmkit score runs/crft/final --data rows.jsonl -o rewards.jsonl"
)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """{"prompt", "response"} rows; a bad row names its file and line."""
    from rmkit.data.records import iter_jsonl

    if not path.exists():
        raise RmkitError(f"no such data file: {path}", where="--data", hint="paths are relative to the current folder")
    if path.is_dir():
        raise RmkitError(f"{path} is a folder; rmkit score reads one JSONL file", where="--data")
    rows = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise RmkitError("a row must be a JSON object", where=where, hint=ROW_HINT)
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise RmkitError(f"field '{key}' must be a string" + ("" if key in row else " (missing)"), where=where,
                                 hint=ROW_HINT)
        rows.append(row)
    if not rows:
        raise RmkitError(f"{path} holds no rows", hint=ROW_HINT)
    return rows


def score_file(checkpoint: str, data: Path, out: Path, batch_size: int | None = None,
               max_length: int | None = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Write each row back with its reward, in input order; returns counts (rows, truncated),
    the time, the device and the loader that produced the rewards."""
    from rmkit.data.records import Record
    from rmkit.evaluate import PROGRESS_MIN_RECORDS, progress_bar, score_records
    from rmkit.inspection import inspect_checkpoint
    from rmkit.io import atomic_write_jsonl
    from rmkit.scorer import load_scorer

    if Path(out).resolve() == Path(data).resolve():
        raise RmkitError("-o would overwrite the --data file", hint="write the rewards to another file")
    ckpt = inspect_checkpoint(checkpoint, max_length)
    rows = read_rows(Path(data))
    records = [Record(r["prompt"], (r["response"],), (0.0,)) for r in rows]
    scorer = load_scorer(ckpt, trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(f"{ckpt.label} · {Path(data).name}", total=len(records),
                            visible=len(records) >= PROGRESS_MIN_RECORDS)
        encoded, rewards = score_records(scorer, records, batch_size, progress=lambda n: bar.advance(task, n))
    seconds = time.perf_counter() - t0
    atomic_write_jsonl(out, ({**row, "reward": r[0]} for row, r in zip(rows, rewards)))
    return {"rows": len(rows), "truncated": sum(e.truncated for e in encoded), "seconds": seconds,
            "max_length": ckpt.encoding.max_length, "device": str(scorer.device), "loader": scorer.loader}


def run_score(checkpoint: str, data: Path, output: Path, batch_size: int | None, max_length: int | None,
              trust_remote_code: bool) -> None:
    """Score the file and print one line of what was done (`rmkit eval --score-only` forwards here)."""
    from rmkit.console import print0

    if batch_size is not None and batch_size < 1:
        raise RmkitError(f"--batch-size must be at least 1, got {batch_size}")
    done = score_file(checkpoint, data, output, batch_size, max_length, trust_remote_code)
    print0(f"scored {done['rows']} rows -> {output} ({done['seconds']:.1f} s on {done['device']}, "
           f"{done['loader']} loader); {done['truncated']} truncated to {done['max_length']} tokens")


def score_command(
    checkpoint: str = typer.Argument(..., metavar="CKPT", help="rmkit checkpoint or HF reward folder."),
    data: Path = typer.Option(..., "--data", help='JSONL of {"prompt", "response"} rows.'),
    output: Path = typer.Option(..., "-o", "--output", help="JSONL to write: each row plus its reward."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per forward (default: 16 on a GPU, 1 on a CPU)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per row (default: the checkpoint's own)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a folder's own model code."),
) -> None:
    run_score(checkpoint, data, output, batch_size, max_length, trust_remote_code)


def register(app: typer.Typer) -> None:
    app.command(name="score", help=HELP, no_args_is_help=True)(score_command)
