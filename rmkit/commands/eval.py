"""`rmkit eval`: preference accuracy of one or more reward models, side by side; or, with
--score-only, a reward for every {"prompt", "response"} row of a JSONL file."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from rmkit.errors import RmkitError

HELP = (
    "Preference accuracy of reward models on eval sets, side by side, each with a 95% interval "
    "from a bootstrap over prompts and, for several models, its paired difference with the first.\n\n"
    "With no --data each checkpoint is scored on the eval sets of its own training recipe "
    "(CKPT/rmkit_recipe.yaml), resolved exactly as training resolved them. CKPT is an rmkit checkpoint "
    "(RUN/final, RUN/checkpoints/step-N) or any Hugging Face reward folder (ForSequenceClassification, "
    "num_labels 1, safetensors).\n\n"
    "Examples:\n\n"
    "rmkit eval runs/grft/final runs/crft/final --json eval.json\n\n"
    "rmkit eval runs/crft/final --data ../shared/data/dsp.json:business --domain business\n\n"
    "rmkit eval runs/crft/final --score-only --data rows.jsonl -o rewards.jsonl"
)


def eval_command(
    checkpoints: List[str] = typer.Argument(..., metavar="CKPT...", help="rmkit checkpoint or HF reward folder(s)."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="PATH[:NAME], any format rmkit reads (repeatable)."),
    domain: Optional[str] = typer.Option(None, "--domain", help="For DSP --data files: the preferred domain."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Records per forward, a record's responses together (default: 16 on a GPU, 1 on a CPU)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every figure and each checkpoint's metadata here."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per row (default: the checkpoint's own)."),
    score_only: bool = typer.Option(False, "--score-only", help='Score {"prompt","response"} rows of one --data JSONL.'),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="--score-only: JSONL to write, one reward per row."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a folder's own model code."),
    bootstrap: int = typer.Option(2000, "--bootstrap", metavar="N", help="Bootstrap resamples of prompts for the 95% intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap (same seed, same intervals)."),
) -> None:
    from rmkit.console import print0

    if score_only:
        if len(checkpoints) != 1 or not data or len(data) != 1 or output is None:
            raise RmkitError("--score-only needs exactly one CKPT, one --data file and -o OUT.jsonl",
                             hint="rmkit eval CKPT --score-only --data rows.jsonl -o rewards.jsonl")
        if json_out is not None or domain is not None:
            raise RmkitError("--json and --domain do not apply to --score-only",
                             hint="--score-only writes one reward per row to -o")
        from rmkit.evaluate import score_file

        done = score_file(checkpoints[0], Path(data[0]), output, batch_size, max_length, trust_remote_code)
        print0(f"scored {done['rows']} rows -> {output} ({done['seconds']:.1f} s on {done['device']}); "
               f"{done['truncated']} truncated to {done['max_length']} tokens")
        return
    if output is not None:
        raise RmkitError("-o applies to --score-only", hint="use --json OUT to save the eval report")
    from rmkit.evaluate import render_report, run_eval

    report = run_eval(checkpoints, data, domain, batch_size, max_length, json_out, trust_remote_code,
                      n_resamples=bootstrap, seed=seed)
    for part in render_report(report):
        print0(part)
    if json_out is not None:
        print0(f"report: {json_out}")


def register(app: typer.Typer) -> None:
    app.command(name="eval", help=HELP, no_args_is_help=True)(eval_command)
