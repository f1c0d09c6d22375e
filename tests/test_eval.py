"""`rmkit eval` on a tiny random Llama: exact rewards, invariance, hand-computed metrics, the CLI.

One real 1-step training run (module fixture, ~15 s) gives an rmkit checkpoint; a plain Hugging
Face reward folder is saved with AutoModelForSequenceClassification.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmkit.data.records import Record, write_records

HAND_REWARDS = [[0.5, 0.2], [1.0, 1.5, 0.0], [2.0, 1.0, 0.0], [0.7, 0.7]]


def rmkit(*args: str, cwd: Path | None = None, timeout: int = 300,
          columns: int = 200) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS=str(columns))
    return subprocess.run([sys.executable, "-m", "rmkit", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def _toy_records() -> list[Record]:
    """Pairs of varied lengths, two 3-response groups (one with a tie), one over-long prompt."""
    recs = []
    for i in range(8):
        prompt = f"## Human:\nquestion {i} " + "about item " * (i % 4) + f"{i % 5}\n\n## Assistant:\n"
        recs.append(Record(prompt, (" yes that is right", " no that is wrong" + " really" * (i % 3)), (1.0, 0.0),
                           "toy", "business"))
    recs.append(Record("## Human:\nrank these\n\n## Assistant:\n", (" yes", " no that is wrong", " maybe"),
                       (2.0, 1.0, 1.0), "toy"))
    recs.append(Record("## Human:\nand these\n\n## Assistant:\n", (" yes that is right", " maybe so", " no"),
                       (3.0, 2.0, 1.0), "toy"))
    recs.append(Record("## Human:\n" + "a very long question " * 12 + "\n\n## Assistant:\n",
                       (" yes that is right", " no that is wrong"), (1.0, 0.0), "toy"))
    return recs


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval-data") / "toy.jsonl"
    write_records(path, _toy_records())
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, toy_data: Path) -> Path:
    """A real GRFT run (1 step) whose recipe has an eval set with a split and a limit."""
    tmp = tmp_path_factory.mktemp("eval-run")
    recipe = tmp / "grft.yaml"
    recipe.write_text(f"""
stage: grft
model: {{path: "{tiny_model_dir}"}}
data:
  train: [{{path: "{toy_data}"}}]
  eval: {{toy: {{path: "{toy_data}", limit: 10}}}}
  max_length: 64
train: {{lr: 1.0e-2, schedule: constant, global_batch: 4, micro_batch: 2, max_steps: 1, seed: 3,
        output_dir: "{tmp / 'run'}"}}
launch: {{deepspeed: zero2, gpus: 1, precision: fp32}}
""")
    res = rmkit("train", "grft", "--recipe", str(recipe))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A plain HF reward folder (no meta.json): LlamaForSequenceClassification, num_labels 1."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    with torch.no_grad():
        model.score.weight.mul_(40.0)  # rewards of order 1, so float noise cannot pass for a difference
    out = tmp_path_factory.mktemp("hf-reward")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return out


def _cpu_scorer(folder: Path, max_length: int | None = None):  # type: ignore[no-untyped-def]
    from rmkit.inspection import inspect_checkpoint
    from rmkit.scorer import load_scorer

    return load_scorer(inspect_checkpoint(folder, max_length), torch.device("cpu"), torch.float32)


# ---- rewards --------------------------------------------------------------------------------------

def test_hf_folder_rewards_equal_model_on_tokenizer_text(hf_dir: Path, tiny_records: list[Record]) -> None:
    """reward == model(**tokenizer(prompt + response)).logits, one text at a time, batched 3 records."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmkit.evaluate import score_records
    from rmkit.model import RewardModel

    records = tiny_records + _toy_records()[:4]
    scorer = _cpu_scorer(hf_dir)
    assert scorer.checkpoint.kind == "hf" and scorer.encoding.max_length == 512  # max_position_embeddings
    assert isinstance(scorer.model, RewardModel)  # a decoder folder: shares each record's token prefix
    encoded, rewards = score_records(scorer, records, batch_size=3, prefix_sharing=True)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()
    for rec, enc, got in zip(records, encoded, rewards):
        for k, response in enumerate(rec.responses):
            inputs = tok(rec.prompt + response, return_tensors="pt")
            assert enc.prompt_ids + enc.response_ids[k] == inputs["input_ids"][0].tolist()
            with torch.no_grad():
                want = model(**inputs).logits[0, 0].item()
            assert got[k] == pytest.approx(want, abs=1e-5)
    assert len({tuple(r) for r in rewards}) == len(records) and max(abs(x) for r in rewards for x in r) > 0.05


def _lone_hf_rewards(folder: Path, records: list[Record]) -> list[list[float]]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return [[model(**tok(r.prompt + x, return_tensors="pt")).logits[0, 0].item() for x in r.responses]
                for r in records]


def test_hf_folder_pooling_skips_trailing_pad_ids_as_hf_does(hf_dir: Path, tmp_path: Path) -> None:
    """HF pools at the last token that is not config.pad_token_id: a text ending in that id is
    scored at the token before it, by the classifier and by rmkit's shared-prefix path alike."""
    from transformers import AutoTokenizer

    from rmkit.evaluate import score_records

    folder = tmp_path / "padded"
    shutil.copytree(hf_dir, folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    rec = Record("## Human:\nsay it\n\n## Assistant:\n", (" yes that is right", " no that is wrong"), (1.0, 0.0))
    last = tok(rec.prompt + rec.responses[0])["input_ids"][-1]
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = last
    (folder / "config.json").write_text(json.dumps(config))
    scorer = _cpu_scorer(folder)
    encoded, got = score_records(scorer, [rec], batch_size=1)
    assert len(encoded[0].prompt_ids + encoded[0].response_ids[0]) == len(tok(rec.prompt + rec.responses[0])["input_ids"]) - 1
    want = _lone_hf_rewards(folder, [rec])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)


def _biased(tmp: Path, hf_dir: Path) -> Path:
    """The HF reward folder with a bias on its score head (what RewardModel's head lacks)."""
    from safetensors.torch import load_file, save_file

    folder = tmp / "biased"
    shutil.copytree(hf_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["score.bias"] = torch.tensor([0.25])
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A plain HF encoder reward folder: BertForSequenceClassification, num_labels 1, whose head
    is `classifier` (with a bias), as encoder reward models ship."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(2)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)  # rewards of order 1
    out = tmp_path_factory.mktemp("encoder-reward")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _raise(exc: BaseException):  # type: ignore[no-untyped-def]
    def raiser(*args: object, **kwargs: object) -> None:
        raise exc

    return raiser


def test_hf_folder_with_a_biased_head_runs_as_the_classifier(hf_dir: Path, tmp_path: Path) -> None:
    """A head rmkit's RewardModel cannot hold runs as AutoModelForSequenceClassification, one
    right-padded row per text, says so, and still scores what the lone forward scores."""
    from rmkit.evaluate import score_records
    from rmkit.scorer import _HFReward

    folder = _biased(tmp_path, hf_dir)
    records = _toy_records()[:4]
    scorer = _cpu_scorer(folder)
    assert isinstance(scorer.model, _HFReward)
    assert (scorer.loader, scorer.loader_reason) == ("hf-sequence-classification",
                                                     "its score head has a bias; RewardModel's has none")
    with pytest.raises(ValueError, match="cannot share the prompt"):
        score_records(scorer, records, prefix_sharing=True)
    _, got = score_records(scorer, records, batch_size=3)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(_lone_hf_rewards(folder, records)), atol=1e-5, rtol=1e-5)


def test_encoder_folder_is_never_tried_as_a_reward_model(encoder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The expected case for the HF loader: a folder with no `score` head (an encoder) is known to
    be one from its safetensors header, so RewardModel is not even tried (a try would fail here),
    and the folder scores what its own class scores on the lone text."""
    from rmkit.evaluate import score_records
    from rmkit.model import RewardModel
    from rmkit.scorer import _HFReward

    monkeypatch.setattr(RewardModel, "from_pretrained", _raise(AssertionError("RewardModel was tried")))
    scorer = _cpu_scorer(encoder_dir)
    assert isinstance(scorer.model, _HFReward)
    assert (scorer.loader, scorer.loader_reason) == ("hf-sequence-classification", "its head is `classifier`, not `score`")
    records = _toy_records()[:4]
    _, got = score_records(scorer, records, batch_size=3)
    want = _lone_hf_rewards(encoder_dir, records)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-5)
    assert max(abs(x) for r in want for x in r) > 0.05


def test_an_unexpected_load_failure_is_reported_never_a_silent_fallback(hf_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder reward folder goes to RewardModel; when that load fails for any reason, the
    failure is the answer (a load error as `could not load ...: RuntimeError: boom`, anything else
    as itself) and AutoModelForSequenceClassification is never tried in its place."""
    import transformers

    from rmkit.errors import RmkitError
    from rmkit.model import RewardModel

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        _raise(AssertionError("fell back to AutoModelForSequenceClassification")))
    monkeypatch.setattr(RewardModel, "from_pretrained", _raise(RuntimeError("boom")))
    with pytest.raises(RmkitError) as err:
        _cpu_scorer(hf_dir)
    assert err.value.problem == f"could not load {hf_dir}: RuntimeError: boom"
    monkeypatch.setattr(RewardModel, "from_pretrained", _raise(TypeError("boom")))
    with pytest.raises(TypeError, match="^boom$"):
        _cpu_scorer(hf_dir)


def test_report_names_the_loader_of_each_checkpoint(hf_dir: Path, tmp_path: Path) -> None:
    """The JSON and the notes under the tables say which loader produced each checkpoint's numbers."""
    import io

    from rich.console import Console

    from rmkit.commands.eval import render_report
    from rmkit.evaluate import run_eval

    biased = _biased(tmp_path, hf_dir)
    out = tmp_path / "report.json"
    report = run_eval([str(hf_dir), str(biased)], [f"{_hand_set(tmp_path / 'hand.jsonl')}:hand"], json_out=out)
    assert [(c["label"], c["loader"], c["loader_reason"]) for c in report["checkpoints"]] == [
        (hf_dir.name, "rmkit-reward", "decoder with a bias-free score head"),
        ("biased", "hf-sequence-classification", "its score head has a bias; RewardModel's has none")]
    assert json.loads(out.read_text()) == report
    buf = io.StringIO()
    console = Console(width=80, file=buf, color_system=None)
    for part in render_report(report):
        console.print(part)
    flat = " ".join(buf.getvalue().split())
    assert f"{hf_dir.name}: scored by the rmkit-reward loader (decoder with a bias-free score head)" in flat
    assert ("biased: scored by the hf-sequence-classification loader (its score head has a bias; RewardModel's "
            "has none): one right-padded row per text") in flat


def test_served_domains_name_their_loader(hf_dir: Path, tmp_path: Path) -> None:
    """`rmkit serve` / `rmkit.load` load through the same loader, and /v1/models says which."""
    from rmkit.serve.registry import build_registry

    registry = build_registry(hf_dir, [("biased", str(_biased(tmp_path, hf_dir)))], torch.device("cpu"), torch.float32)
    assert [(m["id"], m["kind"], m["loader"]) for m in registry.describe()] == [
        ("default", "hf", "rmkit-reward"), ("biased", "hf", "hf-sequence-classification")]


def test_hf_folder_truncation_keeps_bos_and_the_end_and_is_counted(hf_dir: Path) -> None:
    from transformers import AutoTokenizer

    from rmkit.evaluate import score_records

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    rec = Record("## Human:\n" + "a very long question " * 12 + "\n\n## Assistant:\n", (" yes", " no"), (1.0, 0.0))
    encoded, _ = score_records(_cpu_scorer(hf_dir, max_length=16), [rec], batch_size=1)
    row = encoded[0].prompt_ids + encoded[0].response_ids[0]
    full = tok(rec.prompt + " yes")["input_ids"]
    assert encoded[0].truncated and len(row) == 16
    assert row == [tok.bos_token_id] + full[-15:]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_rewards_and_accuracy_do_not_depend_on_batch_or_padding(trained: Path, batch_size: int,
                                                                padding_side: str) -> None:
    from rmkit.evaluate import score_records, set_result

    records = _toy_records()
    scorer = _cpu_scorer(trained / "final")
    # reference: one record per forward, one row per response (no prefix sharing), right padding
    ref_enc, ref = score_records(scorer, records, batch_size=1, padding_side="right", prefix_sharing=False)
    assert len({len(e.prompt_ids) + len(r) for e in ref_enc for r in e.response_ids}) > 5  # rows really pad
    assert sum(e.truncated for e in ref_enc) == 1
    enc, got = score_records(scorer, records, batch_size=batch_size, padding_side=padding_side)
    torch.testing.assert_close(torch.tensor([x for r in got for x in r]), torch.tensor([x for r in ref for x in r]),
                               atol=1e-5, rtol=1e-5)
    a, b = set_result(records, enc, got).summary(), set_result(records, ref_enc, ref).summary()
    assert a.pop("mean_margin") == pytest.approx(b.pop("mean_margin"), abs=1e-5)
    assert a == b  # accuracy, group metrics, ties, truncation: identical


# ---- metrics --------------------------------------------------------------------------------------

def _hand_set(path: Path) -> Path:
    write_records(path, [
        Record("p1", ("long answer", "no"), (1.0, 0.0)),
        Record("p2", ("mid", "longest one", "x"), (2.0, 1.0, 1.0)),
        Record("p3", ("a", "bb", "ccc"), (3.0, 2.0, 1.0)),
        Record("p4", ("same", "diff"), (0.0, 1.0)),
    ])
    return path


def test_metrics_by_hand(hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewards chosen by hand (score_shard replaced); every figure worked out below.

    p1 (1,0) r(.5,.2): right, margin .3, longer wins.  p2 (2,1,1) r(1,1.5,0): 0>1 wrong (-.5), 0>2 right
    (1.0), 1~2 tie skipped; group not all right; top-2 = responses 0,1: wrong. p3 (3,2,1) r(2,1,0): 3 pairs
    right (1, 2, 1); group all right and top-2 right; longer never wins. p4 (0,1) r(.7,.7): equal reward
    counts wrong, margin 0. Pairs 7, right 5, margin 4.8/7, length 2/7 (p1, p2's 0>2), groups 2.
    """
    import rmkit.score
    from rmkit.evaluate import run_eval

    def fake(model, encoded, *args, **kwargs):  # type: ignore[no-untyped-def]
        assert [len(e.response_ids) for e in encoded] == [2, 3, 3, 2]
        return [(i, HAND_REWARDS[i]) for i in range(len(encoded))]

    monkeypatch.setattr(rmkit.score, "score_shard", fake)
    out = tmp_path / "report.json"
    report = run_eval([str(hf_dir)], [f"{_hand_set(tmp_path / 'hand.jsonl')}:hand"], json_out=out)
    r = report["checkpoints"][0]["results"]["hand"]
    assert (r["pairs"], r["ties_skipped"], r["records"], r["truncated"]) == (7, 1, 4, 0)
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["mean_margin"] == pytest.approx(4.8 / 7)
    assert r["length_baseline"] == pytest.approx(2 / 7)
    assert r["group_all_pairs_acc"] == 0.5 and r["group_top2_acc"] == 0.5
    assert json.loads(out.read_text()) == report


def _refuse_constant(name: str) -> None:
    raise ValueError(f"the report holds the non-standard JSON constant {name}")


def test_intervals_and_paired_differences(hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewards faked as in test_metrics_by_hand, for two folders (a copy of one): the intervals are
    the prompt bootstrap of the hand outcomes, the twin's difference is exactly 0 with a zero-width
    interval; a pair-only set ranked all wrong: 0 [0, 0], group metrics null in strict JSON."""
    import rmkit.score
    from rmkit.evaluate import run_eval
    from rmkit.stats import clustered_bootstrap

    def fake(model, encoded, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(encoded) == 4:
            return [(i, HAND_REWARDS[i]) for i in range(4)]
        return [(i, [0.0, 1.0]) for i in range(len(encoded))]  # the better response always scores lower

    monkeypatch.setattr(rmkit.score, "score_shard", fake)
    twin = tmp_path / "twin"
    shutil.copytree(hf_dir, twin)
    wrong = tmp_path / "wrong.jsonl"
    write_records(wrong, [Record(f"q{q}", (" long answer", " no"), (1.0, 0.0)) for q in (0, 0, 1, 1, 1, 2)])
    out = tmp_path / "report.json"
    report = run_eval([str(hf_dir), str(twin)], [f"{_hand_set(tmp_path / 'hand.jsonl')}:hand", f"{wrong}:wrong"],
                      json_out=out)
    text = out.read_text()
    assert json.loads(text, parse_constant=_refuse_constant) == report and "NaN" not in text
    assert report["bootstrap"] == {"unit": "prompt", "resamples": 2000, "seed": 0, "level": 0.95,
                                   "interval": "percentile"}
    # hand set: pairs p1 (right), p2 (wrong, right), p3 (right x3), p4 (wrong); longer wins in p1 and p2's 0>2
    want = clustered_bootstrap([0, 1, 1, 2, 2, 2, 3], [[1, 1], [0, 0], [1, 1], [1, 0], [1, 0], [1, 0], [0, 0]])
    first, second = (c["results"]["hand"] for c in report["checkpoints"])
    assert first["prompts"] == 4 and first["accuracy"] == want.accuracy[0].value == 5 / 7
    assert first["accuracy_ci"] == [want.accuracy[0].lo, want.accuracy[0].hi] == second["accuracy_ci"]
    assert first["length_baseline_ci"] == [want.accuracy[1].lo, want.accuracy[1].hi]
    assert first["accuracy_ci"][0] < 5 / 7 < first["accuracy_ci"][1]
    assert first["diff_vs_first"] is None
    assert second["diff_vs_first"] == {"vs": hf_dir.name, "value": 0.0, "lo": 0.0, "hi": 0.0}
    w = report["checkpoints"][1]["results"]["wrong"]
    assert (w["accuracy"], w["accuracy_ci"], w["pairs"], w["prompts"]) == (0.0, [0.0, 0.0], 6, 3)
    assert w["group_all_pairs_acc"] is None and w["group_top2_acc"] is None  # no groups of 3+: null
    assert w["length_baseline"] == 1.0 and w["length_baseline_ci"] == [1.0, 1.0]
    again = run_eval([str(hf_dir)], [f"{tmp_path / 'hand.jsonl'}:hand"], seed=1)["checkpoints"][0]["results"]["hand"]
    other = clustered_bootstrap([0, 1, 1, 2, 2, 2, 3], [1, 0, 1, 1, 1, 1, 0], seed=1).accuracy[0]
    assert again["accuracy_ci"] == [other.lo, other.hi]


def _wide_report() -> dict:
    """The widest figures a table can hold (100.0 everywhere, a -100.0 difference) under the
    longest built-in labels."""
    def result(k: int) -> dict:
        return {"accuracy": 1.0, "accuracy_ci": [1.0, 1.0], "pairs": 1916, "prompts": 479, "mean_margin": -12.5,
                "length_baseline": 0.612, "length_baseline_ci": [0.581, 0.644], "ties_skipped": 10,
                "truncated": 1916, "records": 1916, "group_all_pairs_acc": None, "group_top2_acc": 0.25,
                "diff_vs_first": None if k == 0 else {"vs": "grft", "value": -1.0, "lo": -1.0, "hi": -1.0}}

    names = ["entertainment", "literature", "academy", "business", "general"]
    labels = ["grft", "crft-entertainment", "crft-literature", "crft-academy", "crft-business"]
    return {"device": "cpu", "dtype": "float32",
            "sets": {n: {"source": {}, "pairs": 1916, "prompts": 479, "records": 1916} for n in names},
            "checkpoints": [{"label": lab, "given": f"runs/cpu/{lab}/final", "path": f"/abs/runs/cpu/{lab}/final",
                             "loader": "rmkit-reward", "loader_reason": "rmkit checkpoint",
                             "encoding": {"max_length": 128}, "results": {n: result(k) for n in names}}
                            for k, lab in enumerate(labels)],
            "bootstrap": {"unit": "prompt", "resamples": 2000, "seed": 0, "level": 0.95, "interval": "percentile"}}


@pytest.mark.parametrize("terminal", [True, False])
def test_tables_fit_80_columns_without_wrapped_labels(terminal: bool) -> None:
    """Rendered at width 80, to a terminal and to a plain file (a log): no line is longer, every
    label and set name stands whole on its row, no cell is cut short."""
    import io

    from rich.console import Console

    from rmkit.commands.eval import render_report

    report = _wide_report()
    buf = io.StringIO()
    console = Console(width=80, file=buf, force_terminal=terminal, color_system=None)
    for part in render_report(report):
        console.print(part)
    lines = buf.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    assert "…" not in buf.getvalue()
    words = [l.split() for l in lines]
    for c in report["checkpoints"]:
        label = c["label"]
        acc_rows = [w for w in words if w[:1] == [label] and w[1:4] == ["100.0", "[100.0,", "100.0]"]]
        assert len(acc_rows) == 5, label  # one row per set
        if label != "grft":
            assert all(w[4:] == ["-100.0", "[-100.0,", "-100.0]"] for w in acc_rows)
        assert [label] + ["100.0"] * 5 in words  # its matrix row
        assert f"{label} = {c['given']}" in lines
        assert f"{label}: scored by the rmkit-reward loader (rmkit checkpoint)" in lines  # which loader made it
    for name in report["sets"]:
        assert [name, "1916/479"] in words and [name] in words  # the set's row in both tables
    assert ["length", "baseline", "61.2", "[58.1,", "64.4]"] in words
    assert ["model", "entertainment", "literature", "academy", "business", "general"] in words


def test_matrix_only_for_two_models_on_two_sets() -> None:
    from rmkit.commands.eval import report_matrix

    report = _wide_report()
    assert report_matrix(report) is not None
    one_set = {**report, "sets": {"general": report["sets"]["general"]}}
    assert report_matrix(one_set) is None
    assert report_matrix({**report, "checkpoints": report["checkpoints"][:1]}) is None


def test_short_labels_from_meta_and_folder_names(tmp_path: Path) -> None:
    from rmkit.inspection import Checkpoint, Encoding, short_labels

    def ckpt(path: str, kind: str = "rmkit", **meta: object) -> Checkpoint:
        return Checkpoint(tmp_path / path, path, kind, dict(meta), Encoding("prompt+response", 64), None)

    assert short_labels([ckpt("a/final", stage="grft", step=6), ckpt("b/final", stage="crft", domain="business")]) \
        == ["grft", "crft-business"]
    assert short_labels([ckpt("r/step-1", stage="grft", step=100), ckpt("r/step-2", stage="grft", step=200)]) \
        == ["grft@100", "grft@200"]
    assert short_labels([ckpt("x/final", stage="grft", step=6), ckpt("y/final", stage="grft", step=6)]) \
        == ["grft#1", "grft#2"]
    assert short_labels([ckpt("hub/smollm2-135m-reward", "hf"), ckpt("run/final", "hf"),
                         ckpt("a-very-long-folder-name-indeed", "hf")]) \
        == ["smollm2-135m-reward", "run/final", "a-very-long-folder-…"]


# ---- the CLI -------------------------------------------------------------------------------------

def test_no_data_uses_the_recipe_eval_sets_and_matches_training(trained: Path, hf_dir: Path) -> None:
    """No --data: the saved recipe's `toy` set (limit 10), the same figures training's final eval
    wrote; a plain folder given beside it (no recipe of its own) is scored on the same set."""
    out = trained.parent / "eval.json"
    res = rmkit("eval", str(trained / "final"), str(hf_dir), "--json", str(out), "--batch-size", "3")
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    ours = report["checkpoints"][0]["results"]["toy"]
    theirs = json.loads((trained / "eval_final.json").read_text())["toy"]
    for key in ("accuracy", "pairs", "length_baseline", "ties_skipped", "truncated", "records",
                "group_all_pairs_acc", "group_top2_acc"):
        assert ours[key] == (None if isinstance(theirs[key], float) and theirs[key] != theirs[key] else theirs[key]), key
    assert ours["mean_margin"] == pytest.approx(theirs["mean_margin"], abs=1e-5)
    assert ours["records"] == 10 and ours["pairs"] == 13 and ours["truncated"] == 0
    ckpt = report["checkpoints"][0]
    assert ckpt["kind"] == "rmkit" and ckpt["meta"]["stage"] == "grft" and ckpt["meta"]["step"] == 1
    assert ckpt["encoding"] == {"style": "prompt+response", "max_length": 64, "truncation_side": "left",
                                "padding_side": "right", "append_eos": False}
    assert report["sets"]["toy"]["source"]["limit"] == 10 and report["batch_size"] == 3
    assert list(report["sets"]) == ["toy"] and report["checkpoints"][1]["results"]["toy"]["pairs"] == 13
    assert "toy" in res.stdout and str(trained / "final") in res.stdout


def test_two_checkpoints_side_by_side_on_data(trained: Path, hf_dir: Path, toy_data: Path, tmp_path: Path) -> None:
    """Two models on two sets at 80 columns: each (set, model) row whole on one line with the
    JSON's figures, the paired difference on the second model's rows, the model x set matrix."""
    out = tmp_path / "two.json"
    res = rmkit("eval", str(trained / "final"), str(hf_dir), "--data", f"{toy_data}:mine",
                "--data", f"{toy_data}:entertainment", "--json", str(out), columns=80)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text(), parse_constant=_refuse_constant)
    assert [c["kind"] for c in report["checkpoints"]] == ["rmkit", "hf"]
    assert [(c["loader"], c["loader_reason"]) for c in report["checkpoints"]] == [
        ("rmkit-reward", "rmkit checkpoint"), ("rmkit-reward", "decoder with a bias-free score head")]
    flat = " ".join(res.stdout.split())
    assert "grft: scored by the rmkit-reward loader (rmkit checkpoint)" in flat
    assert f"{hf_dir.name}: scored by the rmkit-reward loader (decoder with a bias-free score head)" in flat
    assert [c["label"] for c in report["checkpoints"]] == ["grft", hf_dir.name]  # stage from meta.json; folder name
    rm, hf = (c["results"]["mine"] for c in report["checkpoints"])
    assert rm["pairs"] == hf["pairs"] == 14 and rm["ties_skipped"] == 1
    assert rm["prompts"] == 11 and report["sets"]["mine"]["prompts"] == 11  # every toy prompt differs
    assert (rm["truncated"], hf["truncated"]) == (1, 0)  # max_length 64 (its recipe) vs 512 (its config)
    assert rm["length_baseline"] == hf["length_baseline"] and rm["length_baseline_ci"] == hf["length_baseline_ci"]
    assert rm["diff_vs_first"] is None and hf["diff_vs_first"]["vs"] == "grft"
    assert hf["diff_vs_first"]["value"] == pytest.approx(hf["accuracy"] - rm["accuracy"])
    assert report["checkpoints"][1]["encoding"]["style"] == "whole-text"
    assert report["sets"]["mine"]["source"]["format"] == "canonical"
    lines = res.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    for c in report["checkpoints"]:
        r = c["results"]["mine"]
        want = f"  {c['label']} {pct(r['accuracy'])} [{pct(r['accuracy_ci'][0])}, {pct(r['accuracy_ci'][1])}]"
        if r["diff_vs_first"]:
            d = r["diff_vs_first"]
            want += f" {100 * d['value']:+.1f} [{pct(d['lo'])}, {pct(d['hi'])}]".replace("+0.0 ", "0.0 ").replace("-0.0", "0.0")
        assert sum(" ".join(l.split()) == " ".join(want.split()) for l in lines) == 2, want  # both sets
        matrix_row = f"{c['label']} {pct(r['accuracy'])} {pct(c['results']['entertainment']['accuracy'])}"
        assert matrix_row in [" ".join(l.split()) for l in lines]
        assert f"{c['label']} = {c['given']}" in lines  # the legend
    rows = [l.split()[-6:] for l in lines if l.startswith("  ") and l.rstrip().endswith("/11")]
    assert rows == 2 * [[c["label"], f"{r['mean_margin']:+.3f}", pct(r["group_all_pairs_acc"]),
                         pct(r["group_top2_acc"]), "1", f"{r['truncated']}/11"]
                        for c, r in zip(report["checkpoints"], (rm, hf))]


SCORE_ROWS = [{"prompt": "User: hi. Assistant:", "response": " Hello.", "id": 7},
              {"prompt": "User: bread? Assistant:", "response": " Mix flour, water and yeast."},
              {"prompt": "", "response": "A fox."}]


def test_score_writes_a_reward_per_row(hf_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = SCORE_ROWS
    src, out = tmp_path / "rows.jsonl", tmp_path / "rewards.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = rmkit("score", str(hf_dir), "--data", str(src), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "scored 3 rows" in res.stdout and "0 truncated" in res.stdout and "rmkit-reward loader" in res.stdout
    got = [json.loads(l) for l in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "reward"} for g in got] == rows
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        want = [model(**tok(r["prompt"] + r["response"], return_tensors="pt")).logits[0, 0].item() for r in rows]
    assert [g["reward"] for g in got] == pytest.approx(want, abs=1e-5)


def test_score_equals_eval_score_only_and_offline_scoring_exactly(trained: Path, tmp_path: Path) -> None:
    """`rmkit score` on an rmkit checkpoint: the very file `rmkit eval --score-only` writes (it
    forwards there), and each reward exactly what inspect + load_scorer + score_records give
    in-process, the path score-only always took (an over-long, truncated row included)."""
    from rmkit.evaluate import score_records
    from rmkit.inspection import inspect_checkpoint
    from rmkit.scorer import load_scorer

    rows = SCORE_ROWS + [{"prompt": "User: " + "long question " * 40 + "Assistant:", "response": " yes"}]
    src, new, old = tmp_path / "rows.jsonl", tmp_path / "score.jsonl", tmp_path / "score-only.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = str(trained / "final")
    res = rmkit("score", ckpt, "--data", str(src), "-o", str(new))
    assert res.returncode == 0, res.stderr
    assert "scored 4 rows" in res.stdout and "1 truncated to 64 tokens" in res.stdout
    res = rmkit("eval", ckpt, "--score-only", "--data", str(src), "-o", str(old))
    assert res.returncode == 0, res.stderr
    assert new.read_bytes() == old.read_bytes()
    records = [Record(r["prompt"], (r["response"],), (0.0,)) for r in rows]
    _, want = score_records(load_scorer(inspect_checkpoint(ckpt)), records)
    got = [json.loads(line) for line in new.read_text().splitlines()]
    assert [g.pop("reward") for g in got] == [w[0] for w in want]  # exact, not approx
    assert got == rows


@pytest.mark.parametrize("case", ["missing", "bad-row", "same-file"])
def test_score_bad_input_exits_2_with_a_clear_message(case: str, hf_dir: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "rows.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(SCORE_ROWS[0]) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    if case == "missing":
        args, msg = ["--data", str(tmp_path / "nope.jsonl"), "-o", str(out)], \
            f"error: --data: no such data file: {tmp_path / 'nope.jsonl'}"
    elif case == "bad-row":
        args, msg = ["--data", str(src), "-o", str(out)], f"error: {src}:2: field 'response' must be a string (missing)"
    else:
        args, msg = ["--data", str(src), "-o", str(src)], "error: -o would overwrite the --data file"
    res = rmkit("score", str(hf_dir), *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith(msg), res.stderr
    assert "Traceback" not in res.stderr and "hint:" in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def _no_safetensors(tmp: Path, hf_dir: Path) -> Path:
    d = tmp / "bin-only"
    shutil.copytree(hf_dir, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\0")
    return d


def _two_labels(tmp: Path, hf_dir: Path) -> Path:
    d = tmp / "two-labels"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["id2label"] = {"0": "bad", "1": "good"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _incomplete(tmp: Path, trained: Path) -> Path:
    d = tmp / "half"
    shutil.copytree(trained / "final", d)
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(100)
    return d


@pytest.mark.parametrize("case", ["missing", "no-safetensors", "two-labels", "incomplete", "data-missing",
                                  "data-bad", "domain-without-data", "few-resamples"])
def test_bad_input_exits_2_with_a_clear_message_and_no_json(case: str, trained: Path, hf_dir: Path,
                                                            toy_data: Path, tmp_path: Path) -> None:
    good = str(trained / "final")
    data = ["--data", str(toy_data)]
    if case == "missing":
        args, msg = [good, str(tmp_path / "nope"), *data], f"error: no such checkpoint folder: {tmp_path / 'nope'}"
    elif case == "no-safetensors":
        d = _no_safetensors(tmp_path, hf_dir)
        args, msg = [str(d), *data], f"error: {d} has no safetensors weights (it has pytorch_model.bin)"
    elif case == "two-labels":
        d = _two_labels(tmp_path, hf_dir)
        args, msg = [str(d), *data], f"error: {d} is a classifier with 2 labels, not a reward model"
    elif case == "incomplete":
        d = _incomplete(tmp_path, trained)
        args, msg = [str(d)], f"error: {d} is not a complete rmkit checkpoint"
    elif case == "data-missing":
        args, msg = [good, "--data", "nope.jsonl:x"], "error: --data nope.jsonl:x: no such data file: nope.jsonl"
    elif case == "data-bad":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}\n{"prompt": \n')
        args, msg = [good, "--data", str(bad)], f"error: {bad}:2: invalid JSON"
    elif case == "few-resamples":
        args, msg = [good, *data, "--bootstrap", "5"], "error: --bootstrap must be at least 100, got 5"
    else:
        args, msg = [good, "--domain", "business"], "error: --domain applies to --data files only"
    out = tmp_path / "report.json"
    res = rmkit("eval", *args, "--json", str(out))
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith(msg), res.stderr
    assert "Traceback" not in res.stderr and "hint:" in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_default_batch_size_is_16_on_a_gpu_and_1_on_a_cpu() -> None:
    from rmkit.scorer import default_batch_size

    assert default_batch_size(torch.device("cpu")) == 1  # padding is pure waste where one text fills the cores
    assert default_batch_size(torch.device("cuda", 0)) == 16
