"""LoRA adapters and `rmkit merge` on the tiny random Llama.

In-process tests build an adapter checkpoint by hand (LoRA injected, adapter + head moved off
their initial values as training would); the e2e tests train one through the real CLI and
launcher (GRFT full -> CRFT LoRA at ZeRO-3 with 2 processes and imitation; a killed LoRA run
resumed) and merge it with the real `rmkit merge`.
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

from rmkit.checkpoint import META_FILE, finalize, is_complete
from rmkit.data.collate import collate, encode_record
from rmkit.data.records import Record, write_records
from rmkit.errors import RmkitError
from rmkit.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_meta,
    apply_lora,
    base_fingerprint,
    count_parameters,
    from_peft_key,
    to_peft_key,
    write_adapter,
)
from rmkit.merge import merge
from rmkit.model import RewardModel
from rmkit.recipe import LoraSpec

SPEC = LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
# The exact tensors of an adapter checkpoint of the tiny 2-layer Llama with q_proj + v_proj.
ADAPTER_KEYS = {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                for i in (0, 1) for m in ("q_proj", "v_proj") for ab in "AB"} | {"base_model.model.score.weight"}


def rmkit(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rmkit", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=timeout)


def _pairs(tokenizer) -> object:
    recs = [Record("User: how do I bake bread? Assistant:", (" Mix flour and yeast, then bake.", " No idea."), (1.0, 0.0)),
            Record("User: tell a story. Assistant:", (" A fox met a dog.", " No."), (1.0, 0.0))]
    return collate([encode_record(r, tokenizer, 64) for r in recs], pad_id=tokenizer.pad_token_id)


def _rewards(model: RewardModel, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch.input_ids, batch.attention_mask, batch.position_ids).rewards


def _make_adapter(root: Path, base: Path, tokenizer, seed: int = 1) -> tuple[Path, RewardModel]:
    """An adapter checkpoint as Runner.save writes it, with adapter + head moved off their init."""
    model = RewardModel.from_pretrained(base)
    apply_lora(model, SPEC, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    tmp = root / ".tmp-final"
    tmp.mkdir(parents=True)
    write_adapter(tmp, {n: p for n, p in model.named_parameters() if p.requires_grad}, SPEC, base,
                  model.base_prefix, tokenizer)
    meta = {"stage": "crft", "domain": "business", "step": 2, "pooling": "last",
            "encoding": {"max_length": 64, "truncation_side": "left", "append_eos": False},
            **adapter_meta(SPEC, base, base_fingerprint(base), *count_parameters(model))}
    finalize(tmp, root / "final", meta)
    return root / "final", model


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_tokenizer):
    return _make_adapter(tmp_path_factory.mktemp("adapter"), tiny_model_dir, tiny_tokenizer)


def test_adapter_checkpoint_holds_only_adapter_and_head(adapter) -> None:
    from safetensors import safe_open

    ckpt, _ = adapter
    with safe_open(str(ckpt / ADAPTER_WEIGHTS), "pt") as f:
        assert set(f.keys()) == ADAPTER_KEYS
    assert not list(ckpt.glob("model*.safetensors")) and not (ckpt / "config.json").exists()
    cfg = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["modules_to_save"], cfg["task_type"]) == \
        (4, 8.0, ["q_proj", "v_proj"], ["score"], "SEQ_CLS")
    meta = json.loads((ckpt / "meta.json").read_text())
    # 8 LoRA matrices of 4x32 / 32x4 (v_proj out 16: B is 16x4) + head 32
    assert meta["parameters"]["trainable"] == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4) + 32
    assert meta["kind"] == "adapter" and is_complete(ckpt)


def test_key_names_round_trip() -> None:
    name = "base_model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert to_peft_key(name, "model") == "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert from_peft_key(to_peft_key(name, "model"), "model") == name
    emb = "base_model.embed_tokens.lora_embedding_B.default"
    assert to_peft_key(emb, "transformer") == "base_model.model.transformer.embed_tokens.lora_embedding_B"
    assert from_peft_key(to_peft_key(emb, "transformer"), "transformer") == emb
    assert from_peft_key("base_model.model.score.weight", "model") == "score.weight"


def test_merged_equals_unmerged_and_loads_in_transformers(adapter, tmp_path: Path, tiny_tokenizer,
                                                          tiny_model_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    ckpt, unmerged = adapter
    out = tmp_path / "merged"
    res = merge(ckpt, out)
    assert not res.skipped and res.layers == 4 and res.loader == "AutoModelForSequenceClassification"
    assert res.max_diff < 1e-5
    batch = _pairs(tiny_tokenizer)
    want = _rewards(unmerged, batch)
    torch.testing.assert_close(_rewards(RewardModel.from_pretrained(out), batch), want, atol=1e-5, rtol=1e-5)
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        got = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the trained head survives bit for bit, and it is not the base's initial head
    assert torch.equal(hf.score.weight, unmerged.score.weight)
    assert not torch.allclose(hf.score.weight, RewardModel.from_pretrained(tiny_model_dir).score.weight)
    # an untargeted weight is the base's, bit for bit; a targeted one is W + (alpha/r) B @ A
    base = RewardModel.from_pretrained(tiny_model_dir).base_model
    assert torch.equal(hf.model.layers[0].self_attn.k_proj.weight, base.layers[0].self_attn.k_proj.weight)
    q = unmerged.base_model.layers[0].self_attn.q_proj
    delta = 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(hf.model.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight + delta)
    meta = json.loads((out / "meta.json").read_text())
    assert is_complete(out) and meta["stage"] == "crft" and meta["domain"] == "business" and meta["kind"] == "reward"
    # finished by checkpoint.finalize, like every checkpoint: the file table, the time, meta.json last
    table = {f.relative_to(out).as_posix(): f.stat().st_size for f in out.rglob("*") if f.is_file() and f.name != META_FILE}
    assert meta["files"] == table and "model.safetensors" in table and meta["saved_at"]
    last = (out / META_FILE).stat().st_mtime_ns
    assert all(f.stat().st_mtime_ns <= last for f in out.rglob("*") if f.is_file())
    assert meta["merged_from"]["adapter"] == str(ckpt.resolve())
    assert meta["merged_from"]["base_fingerprint"] == base_fingerprint(tiny_model_dir)
    assert not list(out.parent.glob(".tmp-*"))


def test_peft_loads_the_adapter_checkpoint(adapter, tiny_model_dir: Path, tiny_tokenizer) -> None:
    """adapter_config.json is peft's: PeftModel on the HF classifier gives rmkit's unmerged rewards."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    ckpt, unmerged = adapter
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    peft_model = PeftModel.from_pretrained(hf, str(ckpt)).eval()
    batch = _pairs(tiny_tokenizer)
    with torch.no_grad():
        got = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(got, _rewards(unmerged, batch), atol=1e-5, rtol=1e-5)


def test_second_merge_is_a_noop_and_bf16_is_a_new_merge(adapter, tmp_path: Path, tiny_tokenizer) -> None:
    from safetensors import safe_open

    ckpt, unmerged = adapter
    out = tmp_path / "merged"
    merge(ckpt, out)
    stamp = (out / "meta.json").stat().st_mtime_ns
    res = rmkit("merge", str(ckpt), "-o", str(out))
    assert res.returncode == 0, res.stderr
    fp = json.loads((out / "meta.json").read_text())["merged_from"]["adapter_fingerprint"]
    assert f"{out} already holds this merge (adapter fingerprint {fp[:16]}, fp32); nothing to do" in \
        " ".join(res.stdout.split())
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    again = merge(ckpt, out, dtype="bf16")
    assert not again.skipped
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}  # really stored in bf16
    # the folder as written, scored independently of merge's own check: bf16 rounding moves the
    # rewards (so the weights were rounded) but by less than merge's bf16 tolerance
    batch = _pairs(tiny_tokenizer)
    want = _rewards(unmerged, batch)
    got = _rewards(RewardModel.from_pretrained(out, dtype=torch.float32), batch)
    diff = float((got - want).abs().max())
    assert 0.0 < diff <= 5e-2 * max(1.0, float(want.abs().max()))
    assert json.loads((out / "meta.json").read_text())["merge_check"]["max_abs_diff"] == again.max_diff


def test_self_check_failure_writes_nothing(adapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge whose reloaded rewards leave the tolerance is refused and leaves no folder, not
    even a temporary one (bf16 rounding against a tolerance of 0)."""
    import rmkit.merge

    ckpt, _ = adapter
    monkeypatch.setattr(rmkit.merge, "TOLERANCE", {"fp32": 0.0, "bf16": 0.0})
    with pytest.raises(RmkitError) as e:
        merge(ckpt, tmp_path / "merged", dtype="bf16")
    assert e.value.problem.startswith("merged rewards differ from base + adapter by ")
    assert e.value.problem.endswith(f"(tolerance 0); nothing was written to {tmp_path / 'merged'}")
    assert list(tmp_path.iterdir()) == []


def test_wrong_base_is_refused(adapter, tmp_path: Path, tiny_model_dir: Path) -> None:
    ckpt, _ = adapter
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    assert base_fingerprint(other) == base_fingerprint(tiny_model_dir)  # a copy is the same base
    from safetensors.torch import load_file, save_file

    w = load_file(str(other / "model.safetensors"))
    w["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    found = base_fingerprint(other)
    expected = base_fingerprint(tiny_model_dir)
    res = rmkit("merge", str(ckpt), "-o", str(tmp_path / "out"), "--base", str(other))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert (f"base {other} does not match the adapter {ckpt}: expected base fingerprint {expected[:16]} "
            f"(recorded for {tiny_model_dir}), found {found[:16]}") in " ".join(res.stderr.split())
    assert not (tmp_path / "out").exists()
    with pytest.raises(RmkitError, match="does not exist"):
        merge(ckpt, tmp_path / "out", base=tmp_path / "nowhere")


def test_refuses_to_replace_a_folder_merge_did_not_write(adapter, tmp_path: Path) -> None:
    ckpt, _ = adapter
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(RmkitError) as e:
        merge(ckpt, tmp_path / "taken")
    assert e.value.problem == f"{tmp_path / 'taken'} exists and is not a folder written by `rmkit merge`"
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_unknown_target_module_is_a_clear_error(tiny_model_dir: Path) -> None:
    model = RewardModel.from_pretrained(tiny_model_dir)
    with pytest.raises(RmkitError) as e:
        apply_lora(model, LoraSpec(target_modules=["c_attn"]), seed=0)
    assert e.value.where == "model.lora.target_modules" and "q_proj" in e.value.hint


# ---- through the real CLI and launcher ----------------------------------------------------------
def _recipe(tmp: Path, model: Path, stage: str, out: str, **over: object) -> Path:
    data = tmp / "toy.jsonl"
    if not data.exists():
        write_records(data, [Record(f"## Human:\nquestion {i} about item {i % 5}\n\n## Assistant:\n",
                                    (" yes that is right", " no that is wrong"), (1.0, 0.0), "toy", "business")
                             for i in range(16)])
    lora = over.pop("lora", "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}")
    text = f"""
stage: {stage}
domain: {"business" if stage == "crft" else "null"}
model: {{path: "{model}", lora: {lora}}}
data: {{train: [{{path: "{data}"}}], eval: {{toy: {{path: "{data}", limit: 4}}}}, max_length: 64}}
loss: {{imitation_weight: {over.pop("imitation_weight", 0.0)}}}
train: {{lr: 2.0e-2, schedule: constant, global_batch: 8, micro_batch: 2, max_steps: {over.pop("max_steps", 2)},
        save_every: {over.pop("save_every", 0)}, keep_last: 2, seed: 7, output_dir: "{tmp / out}"}}
launch: {{deepspeed: {over.pop("zero", "zero2")}, gpus: {over.pop("gpus", 1)}, precision: fp32}}
"""
    assert not over, over
    p = tmp / f"{out}.yaml"
    p.write_text(text)
    return p


def _adapter_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / ADAPTER_WEIGHTS))


@pytest.mark.e2e
def test_crft_lora_from_full_grft_zero3_two_processes_then_merge(tmp_path: Path, tiny_model_dir: Path) -> None:
    grft = _recipe(tmp_path, tiny_model_dir, "grft", "grft", lora="null")
    assert rmkit("train", "grft", "--recipe", str(grft)).returncode == 0
    parent = tmp_path / "grft" / "final"
    crft = _recipe(tmp_path, parent, "crft", "crft", zero="zero3", gpus=2, imitation_weight=0.5)
    res = rmkit("train", "crft", "--recipe", str(crft), env={"RMKIT_FINGERPRINT": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "crft"
    assert (run / "fingerprint-rank0.txt").read_text() == (run / "fingerprint-rank1.txt").read_text()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "loss_ranking" in m]
    assert len(steps) == 2 and all(m["loss_imitation"] > 0 for m in steps)  # imitation trained every step
    ckpt = run / "final"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["kind"] == "adapter" and meta["base"] == {"path": str(parent.resolve()),
                                                          "fingerprint": base_fingerprint(parent)}
    assert (meta["stage"], meta["domain"]) == ("crft", "business")
    assert (meta["parent"]["stage"], meta["parent"]["path"]) == ("grft", str(parent.resolve()))
    trained = _adapter_tensors(ckpt)
    assert set(trained) == ADAPTER_KEYS
    # trainable params moved: LoRA B starts at 0, the head starts as the GRFT head
    grft_head = RewardModel.from_pretrained(parent).score.weight.detach()
    assert not torch.equal(trained["base_model.model.score.weight"], grft_head)
    assert all(trained[k].abs().sum() > 0 for k in ADAPTER_KEYS if ".lora_B." in k)

    merged = rmkit("merge", str(ckpt), "-o", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "merged 4 LoRA layers" in merged.stdout and "largest reward difference" in merged.stdout
    # base params did not change: untargeted weights equal the GRFT parent's bit for bit
    from safetensors.torch import load_file

    before, after = load_file(str(parent / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert after.keys() <= before.keys()  # training also saves non-persistent rotary buffers
    assert {k.rsplit(".", 1)[0] for k in before.keys() - after.keys()} <= {"model.rotary_emb"}
    for k in after:
        targeted = "q_proj" in k or "v_proj" in k
        assert torch.equal(before[k], after[k]) != (targeted or k == "score.weight"), k


@pytest.mark.e2e
def test_lora_run_killed_then_resumed_equals_uninterrupted(tmp_path: Path, tiny_model_dir: Path) -> None:
    ref = _recipe(tmp_path, tiny_model_dir, "grft", "ref", max_steps=4, save_every=2)
    assert rmkit("train", "grft", "--recipe", str(ref)).returncode == 0
    victim = _recipe(tmp_path, tiny_model_dir, "grft", "victim", max_steps=4, save_every=2)
    assert rmkit("train", "grft", "--recipe", str(victim), env={"RMKIT_FAULT": "step:3"}).returncode != 0
    step2 = tmp_path / "victim" / "checkpoints" / "step-000002"
    assert is_complete(step2) and set(_adapter_tensors(step2)) == ADAPTER_KEYS
    resumed = rmkit("train", "grft", "--recipe", str(victim), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a, b = _adapter_tensors(tmp_path / "ref" / "final"), _adapter_tensors(tmp_path / "victim" / "final")
    assert a.keys() == b.keys() == ADAPTER_KEYS
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_probes_are_rendered_as_the_data_layer_renders(tmp_path: Path) -> None:
    """merge's self-check prompts are what `load_source` makes of the same question as a chat
    row (data.template is gone: the readers' rendering is the only one)."""
    from rmkit.data.readers import load_source
    from rmkit.merge import PROBES

    assert PROBES[0].prompt == "## Human:\nhow do I bake bread?\n\n## Assistant:\n"
    rows = [{"prompt": [{"role": "user", "content": p.prompt.split("\n")[1]}],
             "chosen": [{"role": "assistant", "content": p.responses[0]}],
             "rejected": [{"role": "assistant", "content": p.responses[1]}]} for p in PROBES]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    assert [(r.prompt, r.responses, r.scores) for r in load_source(tmp_path / "chat.json").records] == \
        [(p.prompt, p.responses, p.scores) for p in PROBES]
