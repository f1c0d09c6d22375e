"""End to end through the real CLI and the real `deepspeed` launcher, on a tiny random Llama.

These start processes (about 10-30 s each on a 2-core CPU): every ZeRO stage with 2 processes,
a run killed with SIGKILL (twice) and resumed. The GRFT -> CRFT chain through the launcher is in
tests/test_lora_merge.py (full GRFT, then LoRA CRFT on two processes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmkit.data.records import Record, write_records

pytestmark = pytest.mark.e2e


def _data(path: Path, n: int = 16) -> Path:
    """Learnable pairs: the preferred response says 'yes', the other 'no'."""
    recs = []
    for i in range(n):
        prompt = f"## Human:\nquestion {i} about item {i % 5}\n\n## Assistant:\n"
        recs.append(Record(prompt, (" yes that is right", " no that is wrong"), (1.0, 0.0), "toy", "business"))
    write_records(path, recs)
    return path


def _recipe(tmp: Path, model: str, stage: str = "grft", out: str = "run", **over: object) -> Path:
    data = _data(tmp / "toy.jsonl")
    text = f"""
stage: {stage}
domain: {"business" if stage == "crft" else "null"}
model: {{path: "{model}"}}
data:
  train: [{{path: "{data}"}}]
  eval: {{toy: {{path: "{data}", limit: 8}}}}
  max_length: 64
loss: {{imitation_weight: {over.pop("imitation_weight", 0.0)}}}
train:
  lr: 5.0e-3
  schedule: constant
  global_batch: 8
  micro_batch: {over.pop("micro_batch", 2)}
  max_steps: {over.pop("max_steps", 3)}
  save_every: {over.pop("save_every", 0)}
  keep_last: 2
  seed: 7
  output_dir: "{tmp / out}"
launch:
  deepspeed: {over.pop("zero", "zero2")}
  gpus: {over.pop("gpus", 1)}
  precision: {over.pop("precision", "fp32")}
"""
    assert not over, over
    p = tmp / f"{out}.yaml"
    p.write_text(text)
    return p


def rmkit(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "rmkit", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    for r in rows:
        for k in ("seconds", "tokens_per_s"):
            r.pop(k, None)
    return rows


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2", "zero3"])
def test_two_processes_every_zero_stage(tmp_path: Path, tiny_model_dir: Path, zero: str) -> None:
    recipe = _recipe(tmp_path, str(tiny_model_dir), zero=zero, gpus=2, max_steps=4)
    res = rmkit("train", "grft", "--recipe", str(recipe), env={"RMKIT_FINGERPRINT": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    port = int(re.search(r"--master_port (\d+)", res.stdout).group(1))
    # DeepSpeed's CPU all-reduce buffers (67 MB a rank) of this launch were unlinked; the port is
    # unique to the launch, so other launches on the machine can neither hide nor fail this check
    assert _shm_buffers(port) == set()
    run = tmp_path / "run"
    steps = [m for m in _metrics(run) if "loss_ranking" in m]
    assert len(steps) == 4
    assert steps[-1]["loss_ranking"] < steps[0]["loss_ranking"]  # the same 8 pairs each step: loss falls
    prints = [(run / f"fingerprint-rank{r}.txt").read_text() for r in (0, 1)]
    assert prints[0] == prints[1]  # both ranks hold identical (gathered) weights
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["stage"] == "grft" and meta["step"] == 4
    if zero == "zero3":
        _check_hf_loads_same_rewards(run / "final")


def _shm_buffers(port: int) -> set[str]:
    """The shared-memory buffers of the launch on `port` (`..._<uid>_<addr>_<port>_<rank>`)."""
    shm = Path("/dev/shm")
    return {f.name for f in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")} if shm.is_dir() else set()


def _check_hf_loads_same_rewards(folder: Path) -> None:
    """The saved folder is a plain HF reward model: same rewards as rmkit computes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmkit.data.collate import collate, encode_record
    from rmkit.model import RewardModel

    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    ours = RewardModel.from_pretrained(folder).eval()
    rec = Record("## Human:\nquestion 3 about item 3\n\n## Assistant:\n", (" yes that is right", " no that is wrong"), (1.0, 0.0))
    enc = encode_record(rec, tok, 64)
    batch = collate([enc], pad_id=tok.pad_token_id)
    with torch.no_grad():
        r_ours = ours(batch.input_ids, batch.attention_mask, batch.position_ids).rewards
        r_hf = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(r_hf, r_ours, atol=1e-5, rtol=1e-5)
    assert hf.score.weight.abs().sum() > 0


def test_killed_then_resumed_equals_uninterrupted(tmp_path: Path, tiny_model_dir: Path) -> None:
    """SIGKILL while step 4 is saved, then (resumed) SIGKILL right after step 5, then resumed to the
    end: exactly the weights and metrics of an uninterrupted run."""
    from rmkit.checkpoint import list_checkpoints

    ref = _recipe(tmp_path, str(tiny_model_dir), out="ref", max_steps=6, save_every=2)
    assert rmkit("train", "grft", "--recipe", str(ref)).returncode == 0
    victim = _recipe(tmp_path, str(tiny_model_dir), out="victim", max_steps=6, save_every=2)
    run = tmp_path / "victim"
    killed = rmkit("train", "grft", "--recipe", str(victim), env={"RMKIT_FAULT": "save:4"})
    assert killed.returncode != 0 and not (run / "final").exists()
    assert [s for s, _ in list_checkpoints(run)] == [2]  # the step-4 folder never became a checkpoint
    again = rmkit("train", "grft", "--recipe", str(victim))
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr
    killed = rmkit("train", "grft", "--recipe", str(victim), "--resume", env={"RMKIT_FAULT": "step:5"})
    assert killed.returncode != 0 and not (run / "final").exists()
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]
    resumed = rmkit("train", "grft", "--recipe", str(victim), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a, b = _weights(tmp_path / "ref" / "final"), _weights(run / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _metrics(tmp_path / "ref") == _metrics(run)


def test_crft_from_a_non_grft_parent_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    crft = _recipe(tmp_path, str(tiny_model_dir), stage="crft", out="crft")
    res = rmkit("train", "crft", "--recipe", str(crft))
    assert res.returncode == 2
    assert f"model.path: CRFT must start from a GRFT checkpoint, but {tiny_model_dir} is no rmkit meta.json" in res.stderr
    assert "rmkit train grft" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "crft").exists()


def test_dry_run_prints_command_and_starts_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = _recipe(tmp_path, str(tiny_model_dir), gpus=2, zero="zero3")
    res = rmkit("train", "grft", "--recipe", str(recipe), "--dry-run")
    assert res.returncode == 0, res.stderr
    launcher = "deepspeed --num_gpus 2 --num_nodes 1 --master_port 29500 --log_level warning --module rmkit.train.worker"
    assert f"{launcher} {tmp_path / 'run'}" in res.stdout
    assert "gradient accumulation 2" in res.stdout
    assert "precision fp32: set in the recipe (launch.precision)" in res.stdout
    assert not (tmp_path / "run").exists()
    auto = _recipe(tmp_path, str(tiny_model_dir), out="auto", precision="auto")
    res = rmkit("train", "grft", "--recipe", str(auto), "--dry-run")
    from rmkit.hardware import resolve_precision

    expected = resolve_precision("auto", on_gpu=torch.cuda.is_available())
    assert f"precision {expected[0]}: {expected[1]}" in res.stdout


def test_bf16_on_cpu_trains_and_records_why(tmp_path: Path, tiny_model_dir: Path) -> None:
    """bf16 through DeepSpeed's bf16 engine on a CPU: runs, learns, and run.json says why."""
    recipe = _recipe(tmp_path, str(tiny_model_dir), precision="bf16", max_steps=6)
    res = rmkit("train", "grft", "--recipe", str(recipe))
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["precision"], info["precision_reason"]) == ("bf16", "set in the recipe (launch.precision)")
    rows = [r for r in _metrics(tmp_path / "run") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
