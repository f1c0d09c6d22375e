"""`rmkit eval`: preference accuracy of one or more reward models, side by side.

The figures come from `rmkit.evaluate.run_eval`; this module draws them: the accuracy table with
intervals, the details beside it, the model x set matrix, the legend and the notes (which loader
produced each checkpoint's numbers among them). Every cell is read from the report dict, so the
tables and the --json file cannot disagree. `--score-only` is kept for old scripts and forwards to
`rmkit score` unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

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
    "The notes under the tables (and --json) say which loader produced each checkpoint's numbers: "
    "rmkit-reward (rmkit's RewardModel, prompts shared) or hf-sequence-classification "
    "(AutoModelForSequenceClassification, one right-padded row per text).\n\n"
    "A reward per {\"prompt\", \"response\"} row is `rmkit score` (--score-only still forwards there)."
)


def eval_command(
    checkpoints: List[str] = typer.Argument(..., metavar="CKPT...", help="rmkit checkpoint or HF reward folder(s)."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="PATH[:NAME], any format rmkit reads (repeatable)."),
    domain: Optional[str] = typer.Option(None, "--domain", help="For DSP --data files: the preferred domain."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Records per forward, a record's responses together (default: 16 on a GPU, 1 on a CPU)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every figure and each checkpoint's metadata here."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per row (default: the checkpoint's own)."),
    score_only: bool = typer.Option(False, "--score-only", help="Same as `rmkit score CKPT --data rows.jsonl -o OUT` (kept for old scripts)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="--score-only: JSONL to write, one reward per row."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a folder's own model code."),
    bootstrap: int = typer.Option(2000, "--bootstrap", metavar="N", help="Bootstrap resamples of prompts for the 95% intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap (same seed, same intervals)."),
) -> None:
    from rmkit.console import print0

    if score_only:
        if len(checkpoints) != 1 or not data or len(data) != 1 or output is None:
            raise RmkitError("--score-only needs exactly one CKPT, one --data file and -o OUT.jsonl",
                             hint="rmkit score CKPT --data rows.jsonl -o rewards.jsonl")
        if json_out is not None or domain is not None:
            raise RmkitError("--json and --domain do not apply to --score-only",
                             hint="--score-only is `rmkit score`: one reward per row to -o")
        from rmkit.commands.score import run_score

        run_score(checkpoints[0], Path(data[0]), output, batch_size, max_length, trust_remote_code)
        return
    if output is not None:
        raise RmkitError("-o applies to --score-only", hint="use --json OUT to save the eval report; rows to "
                         "score go to `rmkit score CKPT --data rows.jsonl -o rewards.jsonl`")
    from rmkit.evaluate import run_eval

    report = run_eval(checkpoints, data, domain, batch_size, max_length, json_out, trust_remote_code,
                      n_resamples=bootstrap, seed=seed)
    for part in render_report(report):
        print0(part)
    if json_out is not None:
        print0(f"report: {json_out}")


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
    """What the tables cannot show: drops on read, truncation, which loader produced each
    checkpoint's numbers (and why that one), the interval method."""
    from rmkit.scorer import HF_SEQUENCE_CLASSIFICATION

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
    for c in report["checkpoints"]:
        notes.append(f"{c['label']}: scored by the {c['loader']} loader ({c['loader_reason']})"
                     + (": one right-padded row per text" if c["loader"] == HF_SEQUENCE_CLASSIFICATION else ""))
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


def register(app: typer.Typer) -> None:
    app.command(name="eval", help=HELP, no_args_is_help=True)(eval_command)
