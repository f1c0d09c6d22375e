"""Mixing (weights, rounding, reproducibility) and the prompt-hash split."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import pytest

from rmkit.data.mix import largest_remainder, manifest_path, mix_files, mix_records, parse_source
from rmkit.data.readers import load_source
from rmkit.data.records import Record, read_records, write_records
from rmkit.data.split import bucket, split_file, split_records
from rmkit.errors import RmkitError
from rmkit.io import sha256_file

DATA = Path(os.environ.get("RMKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _recs(name: str, n: int) -> list[Record]:
    return [Record(f"{name} prompt {i}", (f"good {i}", f"bad {i}"), (1.0, 0.0), name) for i in range(n)]


A, B, C = _recs("a", 100), _recs("b", 50), _recs("c", 7)


# --------------------------------------------------------------------------- mix


def test_largest_remainder_exact() -> None:
    assert largest_remainder(10, [Fraction(1, 3)] * 3) == [4, 3, 3]  # ties go to the earlier source
    assert largest_remainder(7, [Fraction(1, 2), Fraction(1, 4), Fraction(1, 4)]) == [3, 2, 2]
    assert largest_remainder(100, [Fraction(7, 10), Fraction(3, 10)]) == [70, 30]


def test_mix_exact_counts_for_weights() -> None:
    mixed, counts = mix_records([("a", A, 3.0), ("b", B, 1.0)], size=40, seed=0)
    assert counts == {"a": 30, "b": 10}
    assert sum(r.source == "a" for r in mixed) == 30 and sum(r.source == "b" for r in mixed) == 10
    assert len(set(mixed)) == 40  # no repetition
    # Without --size: the largest mix that repeats nothing. At 101, 50.5/50.5 rounds to 51/50
    # (the tie goes to the earlier source), which still fits; 102 would need 51 of b's 50.
    _, counts = mix_records([("a", A, 0.5), ("b", B, 0.5)], size=None, seed=0)
    assert counts == {"a": 51, "b": 50}
    _, counts = mix_records([("a", A, 0.7), ("b", B, 0.2), ("c", C, 0.1)], size=None, seed=0)
    # c (7 at 1/10) caps it: sizes 76-79 would round c up to 8; at 75, 52.5/15/7.5 -> 53/15/7.
    assert counts == {"a": 53, "b": 15, "c": 7}


def test_mix_without_weights_takes_everything() -> None:
    mixed, counts = mix_records([("a", A, None), ("b", B, None)], size=None, seed=3)
    assert counts == {"a": 100, "b": 50} and sorted(mixed, key=lambda r: r.prompt) == sorted(A + B, key=lambda r: r.prompt)
    assert mixed != A + B  # shuffled
    with pytest.raises(RmkitError, match="--size needs weights"):
        mix_records([("a", A, None)], size=10, seed=3)


def test_mix_refuses_mixed_weights_and_oversampling() -> None:
    with pytest.raises(RmkitError, match="weights given for some sources but not for b"):
        mix_records([("a", A, 1.0), ("b", B, None)], size=None, seed=0)
    with pytest.raises(RmkitError, match=r"(?s)source c has 7 records but the mix asks for 10.*--allow-repeat"):
        mix_records([("a", A, 0.5), ("c", C, 0.5)], size=20, seed=0)
    mixed, counts = mix_records([("a", A, 0.5), ("c", C, 0.5)], size=20, seed=0, allow_repeat=True)
    assert counts == {"a": 10, "c": 10}
    taken = [r for r in mixed if r.source == "c"]
    assert len(taken) == 10 and set(taken) == set(C)  # one whole pass (7) plus 3 sampled


def test_mix_records_deterministic() -> None:
    one, _ = mix_records([("a", A, 2.0), ("b", B, 1.0)], size=30, seed=11)
    two, _ = mix_records([("a", A, 2.0), ("b", B, 1.0)], size=30, seed=11)
    three, _ = mix_records([("a", A, 2.0), ("b", B, 1.0)], size=30, seed=12)
    assert one == two and one != three


def test_parse_source() -> None:
    assert parse_source("data/x.jsonl:0.3") == ("data/x.jsonl", 0.3)
    assert parse_source("data/x.jsonl") == ("data/x.jsonl", None)
    assert parse_source("odd:name.jsonl") == ("odd:name.jsonl", None)


def test_mix_files_byte_for_byte_and_manifest(tmp_path: Path) -> None:
    write_records(tmp_path / "a.jsonl", A)
    write_records(tmp_path / "b.jsonl", B)
    specs = [f"{tmp_path / 'a.jsonl'}:0.8", f"{tmp_path / 'b.jsonl'}:0.2"]
    m1 = mix_files(specs, tmp_path / "m1.jsonl", size=60, seed=5)
    mix_files(specs, tmp_path / "m2.jsonl", size=60, seed=5)
    mix_files(specs, tmp_path / "m3.jsonl", size=60, seed=6)
    assert (tmp_path / "m1.jsonl").read_bytes() == (tmp_path / "m2.jsonl").read_bytes()
    assert (tmp_path / "m1.jsonl").read_bytes() != (tmp_path / "m3.jsonl").read_bytes()
    assert len(read_records(tmp_path / "m1.jsonl")) == 60
    on_disk = json.loads(manifest_path(tmp_path / "m1.jsonl").read_text())
    assert manifest_path(tmp_path / "m1.jsonl").name == "m1.manifest.json"
    assert on_disk == m1
    assert [(s["records_available"], s["records_taken"], s["weight"]) for s in on_disk["sources"]] == [(100, 48, 0.8), (50, 12, 0.2)]
    assert on_disk["sources"][0]["sha256"] == sha256_file(tmp_path / "a.jsonl")
    assert on_disk["seed"] == 5 and on_disk["size"] == 60 and on_disk["rmkit_version"]


def test_mix_files_error_leaves_nothing(tmp_path: Path) -> None:
    write_records(tmp_path / "c.jsonl", C)
    with pytest.raises(RmkitError, match="has 7 records but the mix asks for 8"):
        mix_files([f"{tmp_path / 'c.jsonl'}:1"], tmp_path / "m.jsonl", size=8, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


# --------------------------------------------------------------------------- split


def test_split_sides_deterministic_salted_and_monotone() -> None:
    """The side of a prompt is a pure function of (prompt, fraction, salt): the same in any run,
    moved by the salt, and a larger fraction only adds prompts to the test side."""
    # sha256(NUL "prompt 0")[:8] / 2**64, and with salt "x": pinned so a split never moves silently
    assert bucket("prompt 0") == 0.44976663739226863 and bucket("prompt 0", "x") == 0.9389114510803965
    recs = [Record(f"prompt {i}", ("a", "b"), (1.0, 0.0)) for i in range(2000)]

    def test_side(fraction: float, salt: str = "") -> set[str]:
        return {r.prompt for r in split_records(recs, fraction, salt)[1]}

    first = test_side(0.2)
    assert first == test_side(0.2) and 300 < len(first) < 500  # about 20%
    assert first != test_side(0.2, salt="x")
    assert first < test_side(0.3)
    assert test_side(0.0) == set() and len(test_side(1.0)) == 2000
    with pytest.raises(RmkitError, match="between 0 and 1"):
        split_records(recs, 1.5)


def test_split_records_disjoint_prompts() -> None:
    recs = [Record(f"p{i % 40}", (f"x{i}", f"y{i}"), (1.0, 0.0)) for i in range(200)]  # 5 records per prompt
    train, test = split_records(recs, 0.25, salt="s")
    assert len(train) + len(test) == 200 and test
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    assert (train, test) == split_records(list(recs), 0.25, salt="s")
    assert train == [r for r in recs if r in train]  # input order kept


def test_split_keeps_dsp_domains_of_a_query_together(tmp_path: Path) -> None:
    path = DATA / "dsp.json"
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set RMKIT_DATA)")
    side: dict[str, set[bool]] = {}
    for domain in ("academy", "business", "entertainment", "literature"):
        train, test = split_records(load_source(path, domain=domain).records, 0.1)
        for r in train + test:
            side.setdefault(r.prompt, set()).add(r in test)
    assert all(len(s) == 1 for s in side.values())


def test_split_file_writes_three_files(tmp_path: Path) -> None:
    write_records(tmp_path / "in.jsonl", A)
    m = split_file(tmp_path / "in.jsonl", 0.3, tmp_path / "out", salt="k")
    train, test = read_records(tmp_path / "out" / "train.jsonl"), read_records(tmp_path / "out" / "test.jsonl")
    assert (train, test) == split_records(A, 0.3, salt="k")
    assert m["train"]["records"] == len(train) and m["test"]["records"] == len(test) == 100 - len(train)
    assert json.loads((tmp_path / "out" / "split.manifest.json").read_text())["salt"] == "k"
