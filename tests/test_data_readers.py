"""Readers: every format to canonical records, with exact counts on the real DSP data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rmkit.data import readers
from rmkit.data.readers import load_source, split_dialogues
from rmkit.data.records import Record, write_records
from rmkit.errors import RmkitError

DATA = Path(os.environ.get("RMKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DOMAINS = ("academy", "business", "entertainment", "literature")


def _real(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set RMKIT_DATA)")
    return path


def _dump(path: Path, rows: object) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- DSP (real data)


@pytest.fixture(scope="module")
def dsp_rows() -> list[dict]:
    return json.loads(_real("dsp.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("domain", DOMAINS)
def test_dsp_pairwise_counts_on_real_data(dsp_rows: list[dict], domain: str) -> None:
    # Expected counts computed here from the raw rows, independently of the reader.
    pairs = [(r["responses"][domain], r["responses"][k]) for r in dsp_rows for k in r["responses"] if k != domain]
    empty = sum(1 for a, b in pairs if not a.strip() or not b.strip())
    identical = sum(1 for a, b in pairs if a == b and a.strip())
    assert len(pairs) == 4 * len(dsp_rows)
    assert 14 <= identical <= 26  # the data README's measured range

    res = load_source(DATA / "dsp.json", domain=domain)
    assert res.format == "dsp" and res.read == len(dsp_rows)
    assert len(res.records) == 4 * len(dsp_rows) - identical - empty
    assert res.dropped == {"identical texts": identical, **({"empty text": empty} if empty else {})}
    rec = res.records[0]
    assert rec.scores == (1.0, 0.0) and rec.source == "dsp" and rec.domain == domain
    assert rec.prompt == "## Human:\n" + dsp_rows[0]["query"] + "\n\n## Assistant:\n"
    assert rec.responses[0] == dsp_rows[0]["responses"][domain]
    assert all(r.responses[0] != r.responses[1] and r.responses[1].strip() for r in res.records)


def test_dsp_listwise_group_shape(dsp_rows: list[dict]) -> None:
    res = load_source(DATA / "dsp.json", domain="academy", listwise=True)
    first = dsp_rows[0]["responses"]
    assert len(set(first.values())) == 5  # the first query's five responses all differ
    rec = res.records[0]
    assert rec.responses == (first["academy"], first["business"], first["entertainment"], first["literature"], first["normal"])
    assert rec.scores == (1.0, 0.0, 0.0, 0.0, 0.0)
    assert rec.pairs() == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert all(r.scores[0] == 1.0 and set(r.scores[1:]) == {0.0} and r.preferred() == 0 for r in res.records)
    assert len(res.records) + sum(v for k, v in res.dropped.items() if k != readers.IDENTICAL_LISTWISE) == len(dsp_rows)


def test_dsp_listwise_removes_identical_responses(tmp_path: Path) -> None:
    rows = [{"query": "q", "responses": {"academy": "A", "business": "A", "entertainment": "E", "literature": "L", "normal": "N"}},
            {"query": "same", "responses": {k: "X" for k in ("academy", "business", "entertainment", "literature", "normal")}}]
    res = load_source(_dump(tmp_path / "d.json", rows), domain="academy", listwise=True)
    assert [r.responses for r in res.records] == [("A", "E", "L", "N")]
    assert res.records[0].meta == {"keys": ["academy", "entertainment", "literature", "normal"]}
    assert res.dropped == {readers.IDENTICAL_LISTWISE: 1, readers.IDENTICAL: 1}


def test_dsp_needs_known_domain(tmp_path: Path) -> None:
    p = _dump(tmp_path / "d.json", [{"query": "q", "responses": {"academy": "a", "business": "b", "normal": "n"}}])
    with pytest.raises(RmkitError, match="DSP data needs --domain; domains in this file: academy, business"):
        load_source(p)
    with pytest.raises(RmkitError, match="unknown domain 'law'; domains in this file: academy, business"):
        load_source(p, domain="law")


# --------------------------------------------------------------------------- text-score


def test_split_hh_template_exact() -> None:
    a = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Name a fruit\n\nAssistant: Apple"
    b = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Name a fruit\n\nAssistant:\nPear, maybe"
    prompt, responses, shared = split_dialogues([a, b])
    assert prompt == "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: Name a fruit\n\nAssistant:"
    assert responses == [" Apple", "\nPear, maybe"]  # leading space / newline kept as is
    assert shared is False


def test_split_md_template_exact() -> None:
    a = "## Human:\nWhy is the sky blue?\n\n\n\n## Assistant:\n Rayleigh scattering [1]."
    b = "## Human:\nWhy is the sky blue?\n\n\n\n## Assistant:\nBecause of the air."
    prompt, responses, _ = split_dialogues([a, b])
    assert prompt == "## Human:\nWhy is the sky blue?\n\n\n\n## Assistant:\n"
    assert responses == [" Rayleigh scattering [1].", "Because of the air."]


def test_split_response_with_its_own_assistant_turn() -> None:
    # Seen 13 times in HH: a response that invents a further turn. Its last tag is not the prompt's end.
    a = "\n\nHuman: q\n\nAssistant: one\n\nHuman: more?\n\nAssistant: two"
    b = "\n\nHuman: q\n\nAssistant: other"
    prompt, responses, shared = split_dialogues([a, b])
    assert prompt == "\n\nHuman: q\n\nAssistant:"
    assert responses == [" one\n\nHuman: more?\n\nAssistant: two", " other"]
    assert shared is True


def test_text_score_mismatch_and_tags_and_groups(tmp_path: Path) -> None:
    rows = [
        {"text": ["\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y"], "score": [1, 0]},  # different prompts
        {"text": ["no tag here", "\n\nHuman: a\n\nAssistant: y"], "score": [1, 0]},
        {"text": ["\n\nHuman: a\n\nAssistant:  ", "\n\nHuman: a\n\nAssistant: y"], "score": [1, 0]},  # empty response
        {"text": ["## Human:\nq\n\n## Assistant:\nA", "## Human:\nq\n\n## Assistant:\nB",
                  "## Human:\nq\n\n## Assistant:\nC"], "score": [2.0, 0.5, 0.5]},  # a group of three, kept whole
        {"text": ["## Human:\nq\n\n## Assistant:\nA", "## Human:\nq\n\n## Assistant:\nB"], "score": [1, 1]},
    ]
    res = load_source(_dump(tmp_path / "ts.json", rows), domain="general")
    assert res.format == "text-score" and res.read == 5
    assert res.dropped == {"prompt mismatch": 1, "no assistant turn": 1, "empty text": 1, "ties only": 1}
    (rec,) = res.records
    assert rec == Record("## Human:\nq\n\n## Assistant:\n", ("A", "B", "C"), (2.0, 0.5, 0.5), "ts", "general")
    assert rec.pairs() == [(0, 1), (0, 2)]


def test_webgpt_ties_counted_on_real_data() -> None:
    raw = json.loads(_real("webgpt.json").read_text(encoding="utf-8"))
    ties = sum(1 for r in raw if len(set(r["score"])) == 1)
    res = load_source(DATA / "webgpt.json")
    assert ties == 188  # the data README's figure
    assert res.dropped["ties only"] == ties
    assert len(res.records) == len(raw) - sum(res.dropped.values())
    assert all(r.prompt.startswith("## Human:\n") and r.prompt.endswith("\n\n## Assistant:\n") for r in res.records)


@pytest.mark.parametrize("name", ["helpful.json", "harmless.json"])
def test_hh_prompts_shared_on_real_data(name: str) -> None:
    raw = json.loads(_real(name).read_text(encoding="utf-8"))
    res = load_source(DATA / name)
    assert "prompt mismatch" not in res.dropped
    assert len(res.records) + sum(res.dropped.values()) == len(raw)
    # The preferred text always comes first in these files, and prompt + response rebuilds it.
    by_text = {r.prompt + r.responses[0] for r in res.records}
    kept = [r for r in raw if r["text"][0] in by_text]
    assert len(kept) == len(res.records)
    assert all(r.scores[0] > r.scores[1] for r in res.records)


# --------------------------------------------------------------------------- chosen-rejected


def test_chosen_rejected_strings(tmp_path: Path) -> None:
    rows = [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"prompt": "Q", "chosen": "same", "rejected": "same"}]
    p = tmp_path / "cr.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    res = load_source(p)
    assert res.format == "chosen-rejected"
    assert [(r.prompt, r.responses, r.scores) for r in res.records] == [
        ("Q: 2+2?", (" 4", " 5"), (1.0, 0.0)),
        ("\n\nHuman: hi\n\nAssistant:", (" hello", " go away"), (1.0, 0.0)),
    ]
    assert res.dropped == {"identical texts": 1}


def test_chosen_rejected_messages(tmp_path: Path) -> None:
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    rows = [
        {"prompt": [u("Hi"), a("Hello!"), u("A fruit?")], "chosen": [a("Apple")], "rejected": [a("Rock")]},
        {"chosen": [u("Hi"), a("Hello!"), u("A fruit?"), a("Pear")], "rejected": [u("Hi"), a("Hello!"), u("A fruit?"), a("Car")]},
    ]
    res = load_source(_dump(tmp_path / "msgs.json", rows))
    prompt = "## Human:\nHi\n\n## Assistant:\nHello!\n\n## Human:\nA fruit?\n\n## Assistant:\n"
    assert [(r.prompt, r.responses) for r in res.records] == [(prompt, ("Apple", "Rock")), (prompt, ("Pear", "Car"))]


def test_chosen_rejected_type_errors(tmp_path: Path) -> None:
    with pytest.raises(RmkitError, match="record 0: fields 'chosen' and 'rejected' must both be strings"):
        load_source(_dump(tmp_path / "a.json", [{"prompt": "p", "chosen": "x", "rejected": [{"role": "assistant", "content": "y"}]}]))
    with pytest.raises(RmkitError, match="record 0: field 'chosen' has a message with unknown role 'robot'"):
        load_source(_dump(tmp_path / "b.json", [{"chosen": [{"role": "robot", "content": "x"}], "rejected": []}]))


# --------------------------------------------------------------------------- canonical and containers

CANON = [Record("p1", ("a", "b"), (1.0, 0.0), "s"), Record("p2", ("c", "d", "e"), (0.0, 2.0, 1.0), "s", "law")]


def test_canonical_round_trip_and_domain_tag(tmp_path: Path) -> None:
    write_records(tmp_path / "c.jsonl", CANON)
    res = load_source(tmp_path / "c.jsonl", domain="general")
    assert res.format == "canonical"
    assert res.records == [Record("p1", ("a", "b"), (1.0, 0.0), "s", "general"), CANON[1]]


def test_parquet_and_saved_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": r.prompt, "responses": list(r.responses), "scores": list(r.scores), "source": "s"} for r in CANON]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "c.parquet", tmp_path / "saved"):
        res = load_source(path)
        assert [(r.prompt, r.responses, r.scores) for r in res.records] == [(r.prompt, r.responses, r.scores) for r in CANON]


def test_bad_inputs_in_process(tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text("   \n", encoding="utf-8")
    with pytest.raises(RmkitError, match="the file holds no records"):
        load_source(tmp_path / "empty.json")
    with pytest.raises(RmkitError, match="the file holds no records"):
        load_source(_dump(tmp_path / "arr.json", []))
    with pytest.raises(RmkitError, match="unknown format 'tsv'"):
        load_source(_dump(tmp_path / "x.json", [{"a": 1}]), format="tsv")
    with pytest.raises(RmkitError, match="cannot tell the format from the fields a"):
        load_source(tmp_path / "x.json")
    with pytest.raises(RmkitError, match="record 1: field 'score' must hold only numbers"):
        load_source(_dump(tmp_path / "s.json", [{"text": ["a", "b"], "score": [1, 0]}, {"text": ["a", "b"], "score": [1, "x"]}]))
    with pytest.raises(RmkitError, match="record 0: 2 texts but 1 scores"):
        load_source(_dump(tmp_path / "n.json", [{"text": ["a", "b"], "score": [1]}]))
    with pytest.raises(RmkitError, match="--listwise applies to DSP data only"):
        load_source(_dump(tmp_path / "t.json", [{"text": ["a", "b"], "score": [1, 0]}]), listwise=True)


# --------------------------------------------------------------------------- pairs and ties


def test_pairs_and_ties_one_rule_everywhere() -> None:
    """strict_pairs / tied_pairs are the rule; the readers' drop, `rmkit data stats` and eval's
    tally all count with it. Scores (2, 1, 1, 0): 5 ordered pairs, 1 tie (responses 1 and 2)."""
    from rmkit.data.collate import EncodedRecord
    from rmkit.data.records import strict_pairs, tied_pairs
    from rmkit.data.stats import compute_stats
    from rmkit.score import SetResult, tally

    scores = (2.0, 1.0, 1.0, 0.0)
    assert strict_pairs(scores) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert tied_pairs(scores) == [(1, 2)]
    assert strict_pairs((1.0, 1.0)) == [] and tied_pairs((1.0, 1.0, 1.0)) == [(0, 1), (0, 2), (1, 2)]
    assert strict_pairs((0.0, 3.0)) == [(1, 0)] and tied_pairs((0.0, 3.0)) == []
    rec = Record("p", ("a", "bb", "c", "dddd"), scores)
    assert rec.pairs() == strict_pairs(scores)
    stats = compute_stats([rec])
    assert (stats["pairs"], stats["ties"]) == (5, 1)
    # longer preferred: a>bb no, a>c no (equal), a>dddd no, bb>dddd no, c>dddd no
    assert stats["longer_preferred"] == 0.0 and stats["same_length_pairs"] == 1
    result = SetResult()
    tally(result, EncodedRecord([1], [[2], [3], [4], [5]], scores), [0.5, 0.7, 0.1, 0.0], [1, 2, 1, 4])
    assert (result.pairs, result.ties_skipped, result.correct) == (5, 1, 4)  # only 0 > 1 is wrong
    assert result.margin_sum == pytest.approx(-0.2 + 0.4 + 0.5 + 0.7 + 0.1)
    assert readers.check_group(["a", "b"], [1.0, 1.0]) == readers.TIES
    assert readers.check_group(["a", "b", "c"], [1.0, 1.0, 0.0]) is None


def test_one_jsonl_parser_for_readers_and_canonical_files(tmp_path: Path) -> None:
    """load_source's JSONL container and read_records parse alike: blank lines skipped, lines
    numbered from 1 in the file, and a U+2028 inside a string (json.dumps(ensure_ascii=False)
    writes it raw) is not a line break."""
    from rmkit.data.records import iter_jsonl, read_records

    rec = Record("p\u2028q", ("a\u2029", "b"), (1.0, 0.0), "ok")
    good = tmp_path / "ok.jsonl"
    assert write_records(good, [rec]) == 1 and "\u2028" in good.read_text(encoding="utf-8")
    assert read_records(good) == [rec] and load_source(good).records == [rec]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec.to_json()) + "\r\n\r\n" + '{"prompt": 1,}\n', encoding="utf-8")
    want = f"{bad}:3: invalid JSON: Expecting property name enclosed in double quotes (column 14)"
    for read in (load_source, read_records, lambda p: list(iter_jsonl(p))):
        with pytest.raises(RmkitError) as e:
            read(bad)
        assert str(e.value).splitlines()[0] == want
        assert e.value.hint == "each line of a JSONL file must be one complete JSON object"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(RmkitError, match="not UTF-8 text"):
        read_records(latin)
    truncated = tmp_path / "cut.jsonl"
    truncated.write_text('{"prompt": "p",\n', encoding="utf-8")  # the error is at the line's end
    for read in (load_source, read_records):
        with pytest.raises(RmkitError, match=r"cut.jsonl:1: invalid JSON: Expecting property name enclosed in "
                                             r"double quotes \(column 16\)"):
            read(truncated)


def test_stats_tokenizer_pads_with_eos_like_everywhere(tmp_path: Path) -> None:
    """`rmkit data stats --tokenizer` loads through rmkit.tokenizer: a tokenizer saved without a
    pad token pads with EOS (id 1 in the tiny tokenizer), as training, eval and merge do."""
    from conftest import build_tiny_tokenizer

    from rmkit.data.stats import load_tokenizer

    tok = build_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert (loaded.pad_token_id, loaded.eos_token_id) == (1, 1)
    with pytest.raises(RmkitError, match=f"no tokenizer folder at {tmp_path / 'nowhere'}"):
        load_tokenizer(tmp_path / "nowhere")
