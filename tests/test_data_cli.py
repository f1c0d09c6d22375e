"""`rmkit data ...` through the real CLI: exact user-facing errors (exit 2, no traceback, no
output left behind), the DSP conversion on real data, and statistics on a tiny file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rmkit.data.records import Record, write_records
from rmkit.data.stats import compute_stats, percentiles

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RMKIT_DATA", REPO.parent / "shared" / "data"))
DSP_DOMAINS = "academy, business, entertainment, literature"


def rmkit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "rmkit", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_user_error(proc: subprocess.CompletedProcess[str], message: str, *absent: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "hint:" in proc.stderr or "Usage" in proc.stderr
    for path in absent:
        assert not path.exists(), path
    leftovers = [p for p in absent[0].parent.iterdir() if p.name.startswith(".tmp-")] if absent else []
    assert not leftovers


def _dsp_rows(n: int = 20) -> list[dict]:
    return [{"query": f"q{i}", "responses": {k: f"{k} {i}" for k in ("academy", "business", "entertainment", "literature", "normal")}}
            for i in range(n)]


# --------------------------------------------------------------------------- bad input


def test_malformed_json_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "responses": ["x", "y"], "scores": [1, 0]}\n{"prompt": "b", oops}\n')
    proc = rmkit("data", "convert", "bad.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert_user_error(proc, "bad.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes (column 17)",
                      tmp_path / "out.jsonl")


def test_json_array_syntax_error(tmp_path: Path) -> None:
    text = '[\n{"query": "q", "responses": {"academy": "a", "normal": "n"}},\n{"query": "q2" "responses": {}}\n]'
    (tmp_path / "bad.json").write_text(text)
    pos = text.index('"responses": {}')  # where the missing comma should be: line 3, column 16
    proc = rmkit("data", "convert", "bad.json", "--domain", "academy", "-o", "out.jsonl", cwd=tmp_path)
    assert_user_error(proc, f"bad.json: invalid JSON: Expecting ',' delimiter (line 3, column 16, character {pos})",
                      tmp_path / "out.jsonl")


def test_missing_field_names_record(tmp_path: Path) -> None:
    rows = _dsp_rows()
    del rows[17]["responses"]
    (tmp_path / "dsp.json").write_text(json.dumps(rows))
    proc = rmkit("data", "convert", "dsp.json", "--domain", "business", "-o", "out.jsonl", cwd=tmp_path)
    assert_user_error(proc, "dsp.json: record 17: missing field 'responses'", tmp_path / "out.jsonl")


def test_unknown_domain_lists_domains(tmp_path: Path) -> None:
    (tmp_path / "dsp.json").write_text(json.dumps(_dsp_rows()))
    proc = rmkit("data", "convert", "dsp.json", "--domain", "law", "-o", "out.jsonl", cwd=tmp_path)
    assert_user_error(proc, f"dsp.json: unknown domain 'law'; domains in this file: {DSP_DOMAINS}", tmp_path / "out.jsonl")


def test_dsp_without_domain(tmp_path: Path) -> None:
    (tmp_path / "dsp.json").write_text(json.dumps(_dsp_rows()))
    proc = rmkit("data", "convert", "dsp.json", "-o", "out.jsonl", cwd=tmp_path)
    assert_user_error(proc, f"dsp.json: DSP data needs --domain; domains in this file: {DSP_DOMAINS}", tmp_path / "out.jsonl")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    proc = rmkit("data", "convert", "empty.jsonl", "-o", "out.jsonl", cwd=tmp_path)
    assert_user_error(proc, "empty.jsonl: the file holds no records", tmp_path / "out.jsonl")


def test_only_ties(tmp_path: Path) -> None:
    rows = [{"text": ["\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: b"], "score": [0.5, 0.5]}] * 3
    (tmp_path / "ties.json").write_text(json.dumps(rows))
    proc = rmkit("data", "convert", "ties.json", "-o", "out.jsonl", cwd=tmp_path)
    assert_user_error(proc, "ties.json: every record is a tie (3 of 3); nothing to learn from", tmp_path / "out.jsonl")


def test_missing_path(tmp_path: Path) -> None:
    proc = rmkit("data", "convert", "nowhere.json", "-o", "out.jsonl", cwd=tmp_path)
    assert_user_error(proc, "no such file or folder: nowhere.json", tmp_path / "out.jsonl")


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps(_dsp_rows()))
    proc = rmkit("data", "convert", "x.json", "--format", "csv", "-o", "out.jsonl", cwd=tmp_path)
    assert_user_error(proc, "unknown format 'csv'\n  hint: formats: dsp, text-score, chosen-rejected, canonical",
                      tmp_path / "out.jsonl")


def test_mix_mixed_weights_and_oversampling(tmp_path: Path) -> None:
    write_records(tmp_path / "a.jsonl", [Record(f"p{i}", ("x", "y"), (1.0, 0.0)) for i in range(5)])
    write_records(tmp_path / "b.jsonl", [Record(f"q{i}", ("x", "y"), (1.0, 0.0)) for i in range(5)])
    out = tmp_path / "m.jsonl"
    proc = rmkit("data", "mix", "--source", "a.jsonl:0.5", "--source", "b.jsonl", "--seed", "1", "-o", "m.jsonl", cwd=tmp_path)
    assert_user_error(proc, "weights given for some sources but not for b.jsonl", out, tmp_path / "m.manifest.json")
    proc = rmkit("data", "mix", "--source", "a.jsonl:1", "--source", "b.jsonl:1", "--size", "12", "--seed", "1",
                 "-o", "m.jsonl", cwd=tmp_path)
    assert_user_error(proc, "source a.jsonl has 5 records but the mix asks for 6", out, tmp_path / "m.manifest.json")
    assert "--allow-repeat" in proc.stderr


def test_usage_error_has_no_traceback(tmp_path: Path) -> None:
    proc = rmkit("data", "convert", "x.json", "--bogus", cwd=tmp_path)
    assert_user_error(proc, "No such option: --bogus")


# --------------------------------------------------------------------------- happy paths


def test_convert_real_dsp_business(tmp_path: Path) -> None:
    src = DATA / "dsp.json"
    if not src.exists():
        pytest.skip(f"real data not found at {src} (set RMKIT_DATA)")
    rows = json.loads(src.read_text(encoding="utf-8"))
    identical = sum(r["responses"][k] == r["responses"]["business"] for r in rows for k in r["responses"] if k != "business")
    empty = sum(not r["responses"][k].strip() for r in rows for k in r["responses"])  # one empty `normal` answer
    proc = rmkit("data", "convert", src, "--domain", "business", "-o", "x.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = len((tmp_path / "x.jsonl").read_text(encoding="utf-8").splitlines())
    assert written == 4 * len(rows) - identical - empty
    assert re.search(rf"records written\s*│\s*{written}\s*│", proc.stdout), proc.stdout
    assert re.search(rf"dropped: identical texts\s*│\s*{identical}\s*│", proc.stdout), proc.stdout
    assert re.search(rf"dropped: empty text\s*│\s*{empty}\s*│", proc.stdout), proc.stdout


def test_mix_and_split_cli(tmp_path: Path) -> None:
    write_records(tmp_path / "a.jsonl", [Record(f"p{i}", ("x", "y"), (1.0, 0.0)) for i in range(30)])
    args = ("data", "mix", "--source", "a.jsonl:1", "--size", "20", "--seed", "3", "-o")
    assert rmkit(*args, "m1.jsonl", cwd=tmp_path).returncode == 0
    assert rmkit(*args, "m2.jsonl", cwd=tmp_path).returncode == 0
    assert (tmp_path / "m1.jsonl").read_bytes() == (tmp_path / "m2.jsonl").read_bytes()
    assert json.loads((tmp_path / "m1.manifest.json").read_text())["sources"][0]["records_taken"] == 20
    proc = rmkit("data", "split", "m1.jsonl", "--test", "0.3", "-o", "sp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["split.manifest.json", "test.jsonl", "train.jsonl"]


# --------------------------------------------------------------------------- stats

TINY = [
    Record("ab", ("long answer", "short"), (1.0, 0.0)),          # preferred is longer
    Record("abcd", ("x", "yyyy"), (1.0, 0.0)),                    # preferred is shorter
    Record("", ("aa", "bb", "cccccc"), (2.0, 2.0, 1.0)),          # a tie, and two pairs won by the shorter text
]


def test_compute_stats_exact() -> None:
    s = compute_stats(TINY)
    assert s["records"] == 3 and s["pairs"] == 4 and s["ties"] == 1
    assert s["responses_per_record"] == {"min": 2, "mean": 7 / 3, "max": 3}
    assert s["prompt_chars"] == {"p50": 2, "p90": 4, "p99": 4, "max": 4}            # lengths 0, 2, 4
    assert s["response_chars"] == {"p50": 4, "p90": 11, "p99": 11, "max": 11}       # 1 2 2 4 5 6 11
    assert s["longer_preferred"] == 1 / 4 and s["same_length_pairs"] == 0
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}


def test_compute_stats_tokens_with_a_tokenizer() -> None:
    def words(texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[str]]]:
        return {"input_ids": [t.split() for t in texts]}

    s = compute_stats([Record("one two three", ("a b", "c"), (1.0, 0.0))], tokenizer=words)
    assert s["prompt_tokens"]["max"] == 3 and s["response_tokens"] == {"p50": 1, "p90": 2, "p99": 2, "max": 2}


def test_stats_cli(tmp_path: Path) -> None:
    write_records(tmp_path / "tiny.jsonl", TINY)
    proc = rmkit("data", "stats", "tiny.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for text in ("2 / 2.33 / 3", "2 / 4 / 4 / 4", "4 / 11 / 11 / 11", "25.0%"):
        assert text in proc.stdout, proc.stdout
