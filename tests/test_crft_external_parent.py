"""CRFT from any open reward model: a Hugging Face sequence-classification folder with one label
(no rmkit meta.json) is the parent, recorded in the lineage as an external GRFT stage with its
path and fingerprint; a causal LM, num_labels != 1 and pickled weights are refused clearly.

One real CRFT run (the deepspeed launcher, 1 step) starts from a TRL-style folder; the plain
LlamaForSequenceClassification folder is checked through the same planning code the CLI runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmkit.data.records import Record, write_records
from rmkit.lora import base_fingerprint


def rmkit(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rmkit", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def _reward_folder(out: Path, tiny: Path, num_labels: int = 1, safe: bool = True) -> Path:
    """What `AutoModelForSequenceClassification.from_pretrained(base, num_labels=...).save_pretrained` writes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny), num_labels=num_labels)
    if safe:
        model.save_pretrained(out)
    else:  # a pickled state dict, as old checkpoints and some releases ship
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(str(tiny)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def plain_rm(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return _reward_folder(tmp_path_factory.mktemp("plain-rm"), tiny_model_dir)


@pytest.fixture(scope="module")
def trl_rm(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A TRL RewardTrainer output: the reward folder plus the Trainer's files (training_args.bin is a
    pickle of the arguments, not weights; a model card; a chat template in the tokenizer config)."""
    out = _reward_folder(tmp_path_factory.mktemp("trl-rm"), tiny_model_dir)
    torch.save({"learning_rate": 1e-5, "center_rewards_coefficient": None}, out / "training_args.bin")
    (out / "README.md").write_text("---\nlibrary_name: transformers\ntags: [trl, reward-trainer]\n---\n")
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["id2label"] == {"0": "LABEL_0"}
    return out


def _recipe(tmp: Path, parent: Path, out: str = "crft") -> Path:
    data = tmp / "toy.jsonl"
    write_records(data, [Record(f"## Human:\nquestion {i}\n\n## Assistant:\n", (" yes that is right", " no"),
                                (1.0, 0.0), "toy", "business") for i in range(8)])
    p = tmp / f"{out}.yaml"
    p.write_text(f"""
stage: crft
domain: business
model: {{path: "{parent}"}}
data:
  train: [{{path: "{data}"}}]
  max_length: 48
train: {{lr: 1.0e-3, schedule: constant, global_batch: 4, micro_batch: 2, max_steps: 1, seed: 3,
        output_dir: "{tmp / out}"}}
launch: {{deepspeed: zero2, gpus: 1, precision: fp32}}
""")
    return p


def _external(folder: Path) -> dict[str, object]:
    return {"path": str(folder.resolve()), "stage": "grft", "external": True, "fingerprint": base_fingerprint(folder),
            "architectures": ["LlamaForSequenceClassification"], "model_type": "llama"}


@pytest.mark.e2e
def test_crft_from_a_trl_style_reward_folder_trains_and_records_it_as_external_grft(trl_rm: Path,
                                                                                    tmp_path: Path) -> None:
    res = rmkit("train", "crft", "--recipe", str(_recipe(tmp_path, trl_rm)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    meta = json.loads((tmp_path / "crft" / "final" / "meta.json").read_text())
    assert meta["stage"] == "crft" and meta["domain"] == "business" and meta["kind"] == "reward"
    assert meta["parent"] == _external(trl_rm)
    from rmkit.serve.registry import build_registry  # served, its lineage names the external parent

    registry = build_registry(tmp_path / "crft" / "final")
    assert registry.describe()[0]["parent"] == _external(trl_rm)


def test_a_plain_llama_reward_folder_is_an_external_grft_parent(plain_rm: Path, tmp_path: Path) -> None:
    from rmkit.recipe import load_recipe
    from rmkit.train.rundir import _parent_entry, plan_run

    plan = plan_run(load_recipe(_recipe(tmp_path, plain_rm)))
    assert _parent_entry(plan) == _external(plain_rm)
    res = rmkit("train", "crft", "--recipe", str(_recipe(tmp_path, plain_rm)), "--dry-run")
    assert res.returncode == 0, res.stderr[-3000:]


def _two_labels(tmp: Path, tiny: Path) -> Path:
    return _reward_folder(tmp / "two-labels", tiny, num_labels=2)


def _pickled(tmp: Path, tiny: Path) -> Path:
    return _reward_folder(tmp / "pickled", tiny, safe=False)


def _biased(tmp: Path, tiny: Path) -> Path:
    from safetensors.torch import load_file, save_file

    out = _reward_folder(tmp / "biased", tiny)
    weights = load_file(str(out / "model.safetensors"))
    weights["score.bias"] = torch.zeros(1)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("case, make, message", [
    ("causal LM", lambda tmp, tiny: tiny,
     "is no rmkit meta.json and a causal language model (LlamaForCausalLM), not a reward model"),
    ("two labels", _two_labels, "is a classifier with 2 labels, not a reward model"),
    ("pickled weights", _pickled, "lacks weights as safetensors"),
    ("biased head", _biased, "has a score head with a bias"),
])
def test_what_is_not_a_reward_model_is_refused_clearly(case: str, make: object, message: str, tmp_path: Path,
                                                       tiny_model_dir: Path) -> None:
    folder = make(tmp_path, tiny_model_dir)  # type: ignore[operator]
    res = rmkit("train", "crft", "--recipe", str(_recipe(tmp_path, folder)))
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr and ("model.path" in res.stderr or case == "pickled weights"), res.stderr
    if case == "pickled weights":
        assert "Convert .bin weights to safetensors" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "crft").exists()
