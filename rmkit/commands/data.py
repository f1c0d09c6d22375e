"""`rmkit data ...`: convert, mix, split and inspect preference data.

Each command parses its flags and calls one function from `rmkit.data`; those functions raise
`RmkitError` before writing anything, so a failed command leaves no output file behind. Only
light modules are imported here (no torch, transformers or datasets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from rmkit.console import print0

app = typer.Typer(help="Convert, mix, split and inspect preference data (canonical JSONL).", no_args_is_help=True)


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for k, v in rows:
        table.add_row(k, v)
    return table


@app.command()
def convert(
    input: Path = typer.Argument(..., help="JSON array, JSONL, parquet file or saved datasets folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Canonical JSONL to write."),
    format: Optional[str] = typer.Option(None, "--format", help="dsp, text-score, chosen-rejected or canonical (default: detect)."),
    domain: Optional[str] = typer.Option(None, "--domain", help="DSP: the domain whose response is preferred; others: tag records."),
    listwise: bool = typer.Option(False, "--listwise", help="DSP: one ranked group per query instead of 4 pairs."),
) -> None:
    """Convert a preference file to canonical JSONL; every dropped pair is counted by reason."""
    from rmkit.data.convert import convert as run
    from rmkit.data.convert import summary_rows

    result = run(input, output, format=format, domain=domain, listwise=listwise)
    print0(_table(f"{input} -> {output}", summary_rows(result)))


@app.command()
def mix(
    source: list[str] = typer.Option(..., "--source", help="PATH[:WEIGHT]; repeat per source. Weights for all or none."),
    output: Path = typer.Option(..., "-o", "--output", help="Mixed canonical JSONL; OUT.manifest.json goes beside it."),
    seed: int = typer.Option(..., "--seed", help="Seed for sampling and order (the output is reproducible from it)."),
    size: Optional[int] = typer.Option(None, "--size", help="Records in the mix (default: the most that needs no repetition)."),
    allow_repeat: bool = typer.Option(False, "--allow-repeat", help="Allow taking more records than a source holds."),
) -> None:
    """Mix sources by weight (general-preference enrichment), deterministically from --seed."""
    from rmkit.data.mix import manifest_path, mix_files

    manifest = mix_files(source, output, size=size, seed=seed, allow_repeat=allow_repeat)
    rows = [(s["path"], f"{s['records_taken']} of {s['records_available']}"
             + (f" (weight {s['weight_normalized']:.3f})" if s["weight_normalized"] is not None else ""))
            for s in manifest["sources"]]
    rows += [("total", str(manifest["size"])), ("manifest", str(manifest_path(output)))]
    print0(_table(f"mix -> {output} (seed {seed})", rows))


@app.command()
def split(
    path: Path = typer.Argument(..., help="Preference file (any supported format)."),
    test: float = typer.Option(..., "--test", help="Fraction of prompts for the test side, e.g. 0.1."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for train.jsonl, test.jsonl, split.manifest.json."),
    salt: str = typer.Option("", "--salt", help="Changes which prompts land in test, still deterministically."),
    domain: Optional[str] = typer.Option(None, "--domain", help="Needed only for raw DSP input."),
) -> None:
    """Split by a hash of the prompt: one prompt (and all DSP domains of a query) stays on one side."""
    from rmkit.data.split import split_file

    m = split_file(path, test, output, salt=salt, domain=domain)
    print0(_table(f"{path} -> {output}", [
        ("train", f"{m['train']['records']} records, {m['train']['prompts']} prompts"),
        ("test", f"{m['test']['records']} records, {m['test']['prompts']} prompts"),
    ]))


def _fmt(d: dict[str, Any]) -> str:
    return " / ".join(str(d[k]) for k in ("p50", "p90", "p99", "max"))


@app.command()
def stats(
    paths: list[Path] = typer.Argument(..., help="One or more preference files."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Local tokenizer folder: also report token lengths."),
    domain: Optional[str] = typer.Option(None, "--domain", help="Needed only for raw DSP input."),
) -> None:
    """Records, pairs, ties, length percentiles, and the longer-is-preferred baseline per file."""
    from rmkit.data.readers import load_source
    from rmkit.data.stats import compute_stats, load_tokenizer

    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    results = [(p, load_source(p, domain=domain)) for p in paths]  # read all first: fail before printing
    for p, result in results:
        s = compute_stats(result.records, tok)
        rpr = s["responses_per_record"]
        rows = [
            ("format", result.format), ("records", str(s["records"])), ("pairs", str(s["pairs"])),
            ("ties", str(s["ties"])),
            ("responses per record (min/mean/max)", f"{rpr['min']} / {rpr['mean']:.2f} / {rpr['max']}"),
            ("prompt chars (p50/p90/p99/max)", _fmt(s["prompt_chars"])),
            ("response chars (p50/p90/p99/max)", _fmt(s["response_chars"])),
        ]
        if tok is not None:
            rows += [("prompt tokens (p50/p90/p99/max)", _fmt(s["prompt_tokens"])),
                     ("response tokens (p50/p90/p99/max)", _fmt(s["response_tokens"]))]
        lp = s["longer_preferred"]
        rows.append(("preferred is longer (length baseline)", "n/a" if lp is None else f"{lp:.1%}"))
        if result.dropped:
            rows.append(("dropped on read", ", ".join(f"{n} {r}" for r, n in result.dropped.most_common())))
        print0(_table(str(p), rows))
