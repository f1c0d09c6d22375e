"""`rmkit data convert`: any supported format -> canonical JSONL, with a summary of what was dropped.

Conversion is the one place raw data becomes training records, so its summary is the audit trail:
rows read, records written, pairs, and each drop reason with its count.
"""

from __future__ import annotations

import os
from pathlib import Path

from rmkit.data.readers import ConvertResult, load_source
from rmkit.data.records import write_records
from rmkit.errors import RmkitError


def convert(input: str | os.PathLike[str], output: str | os.PathLike[str], format: str | None = None,
            domain: str | None = None, listwise: bool = False) -> ConvertResult:
    """Read `input`, write canonical JSONL to `output` atomically; nothing is written on error."""
    if Path(output).resolve() == Path(input).resolve():
        raise RmkitError(f"the output {output} is the input file", hint="write the converted records to a new file")
    result = load_source(input, format=format, domain=domain, listwise=listwise)
    write_records(output, result.records)
    return result


def summary_rows(result: ConvertResult) -> list[tuple[str, str]]:
    """(label, value) lines for the CLI table; drops listed by reason, most frequent first."""
    rows = [
        ("format", result.format),
        ("records read", str(result.read)),
        ("records written", str(len(result.records))),
        ("pairs", str(result.pairs)),
        ("dropped", str(sum(result.dropped.values())) if result.dropped else "0"),
    ]
    rows += [(f"  dropped: {reason}", str(n)) for reason, n in result.dropped.most_common()]
    rows += [(f"  note: {reason}", str(n)) for reason, n in result.notes.most_common()]
    return rows
