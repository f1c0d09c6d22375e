"""The engine seam (rmkit/train/engine.py): the local engine trains like DeepSpeed's ZeRO-0 engine,
skips non-finite updates the same way, accumulates exactly, and resumes bit-exactly; a whole run
on it writes a complete checkpoint with no process group at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rmkit.data.records import Record, write_records

RECORDS = [Record(f"question {i}? ", (" yes that is right", " no"), (1.0, 0.0)) for i in range(8)]


def _run_dir(tmp: Path, model: Path, name: str, **train: object) -> Path:
    from rmkit.recipe import Recipe
    from rmkit.train.rundir import plan_run, write_run_dir

    data = tmp / "pairs.jsonl"
    write_records(data, RECORDS)
    t = {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 1, "global_batch": 4, "micro_batch": 2, "max_steps": 3,
         "seed": 0, "save_every": 0, "output_dir": str(tmp / name)}
    t.update(train)
    recipe = Recipe.model_validate({
        "stage": "grft", "model": {"path": str(model)},
        "data": {"train": [{"path": str(data)}], "max_length": 32},
        "loss": {"imitation_weight": 0.5},
        "train": t,
        "launch": {"deepspeed": "zero0", "gpus": 1, "precision": "fp32"},
    })
    plan = plan_run(recipe)
    write_run_dir(recipe, plan)
    return plan.run_dir


def _weights(trainer) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_local_engine_steps_like_deepspeed_zero0(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from rmkit.train.launch import free_port
    from rmkit.train.loop import Trainer

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)  # what the launcher sets; removed again after the test
    out = {}
    for kind in ("deepspeed", "local"):
        trainer = Trainer(_run_dir(tmp_path, tiny_model_dir, kind), engine=kind)
        trainer.engine.train()
        before = _weights(trainer)
        losses = [trainer.train_step(s)["loss"] for s in range(3)]
        out[kind] = (losses, _weights(trainer), trainer.engine.lr, trainer.engine.global_steps)
    ds, local = out["deepspeed"], out["local"]
    assert local[3] == ds[3] == 3 and local[2] == pytest.approx(ds[2], rel=1e-12)
    assert local[0] == pytest.approx(ds[0], rel=1e-5)
    for name, p in ds[1].items():
        torch.testing.assert_close(local[1][name], p, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(before[n], p) for n, p in local[1].items())  # the steps changed the weights


def test_local_engine_drops_a_nonfinite_update_and_holds_the_schedule(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rmkit.train.loop import Trainer

    trainer = Trainer(_run_dir(tmp_path, tiny_model_dir, "nan"), engine="local")
    eng = trainer.engine
    before, lr = _weights(trainer), eng.lr
    for i, scale in enumerate((float("nan"), 1.0)):  # a NaN micro-batch, then a finite one closes the step
        loss = trainer.model(**trainer._collate(trainer.train_enc[2 * i:2 * i + 2]).model_inputs()).rewards.sum()
        eng.backward(loss * scale)
        eng.step()
        if i == 0:
            assert eng.micro_steps == 1 and eng.global_steps == 0  # accumulating: nothing decided yet
    assert (eng.global_steps, eng.skipped_steps, eng.lr) == (1, 1, lr)
    after = _weights(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_local_engine_accumulates_the_mean_of_its_micro_batches(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two micro-batches of 2 under accumulation 2 step exactly like one micro-batch of 4 (the
    ranking loss is a mean over pairs, so the loss of 4 is the mean of the two halves)."""
    from rmkit.train.loop import Trainer

    grads = []
    for micro in (2, 4):
        trainer = Trainer(_run_dir(tmp_path, tiny_model_dir, f"acc{micro}", micro_batch=micro, lr=1e-3,
                                   warmup_steps=0, schedule="constant"), engine="local")
        trainer.model.zero_grad()
        for start in range(0, 4, micro):
            batch = trainer._collate(trainer.train_enc[start:start + micro])
            out = trainer.model(**batch.model_inputs())
            from rmkit.loss import ranking_loss

            trainer.engine.backward(ranking_loss(out.rewards, batch.better, batch.worse))
        grads.append(trainer.model.score.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-5)
    assert grads[0].abs().sum() > 0


def test_local_run_saves_and_resumes_bit_exactly(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A whole run on the local engine (no process group): checkpoint at step 2, then a second
    Trainer resumed from it ends with the very weights of the uninterrupted run, and both print
    the final done line."""
    from rmkit.checkpoint import is_complete, list_checkpoints
    from rmkit.train.loop import Trainer

    whole = _run_dir(tmp_path, tiny_model_dir, "whole", save_every=2, max_steps=4)
    Trainer(whole, engine="local").run()
    assert f"done: {whole / 'final'}" in capsys.readouterr().out
    cut = _run_dir(tmp_path, tiny_model_dir, "cut", save_every=2, max_steps=4)
    first = Trainer(cut, engine="local")
    for s in range(3):  # one step past the checkpoint of step 2, then "killed"
        first.train_step(s)
        if s + 1 == 2:
            first.save(2)
    assert [s for s, _ in list_checkpoints(cut)] == [2]
    killed_save = cut / "checkpoints" / ".tmp-step-000004"  # what a kill in the middle of a save leaves
    (killed_save / "state").mkdir(parents=True)
    resumed = Trainer(cut, resume=True, engine="local")
    assert resumed.restore() == 2
    assert not killed_save.exists()  # removed on resume, before any step could stop the run
    final = Trainer(cut, resume=True, engine="local").run()
    assert is_complete(final) and is_complete(whole / "final")
    from safetensors.torch import load_file

    a, b = load_file(str(whole / "final" / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cpu_adamw_runs_fused_in_both_engines(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On CPU both engines step torch's fused AdamW kernel (10-14x its per-tensor loop on SmolLM2-135M: bench/adamw_step.py),
    configured once, in the DeepSpeed config's optimizer params."""
    import json

    from rmkit.train.launch import free_port
    from rmkit.train.loop import Trainer

    if torch.cuda.is_available():
        pytest.skip("on a GPU DeepSpeed's FusedAdam steps instead")
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    run = _run_dir(tmp_path, tiny_model_dir, "fused")
    params = json.loads((run / "ds_config.json").read_text())["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    for kind in ("deepspeed", "local"):
        opt = Trainer(run, engine=kind).engine.optimizer
        inner = getattr(opt, "optimizer", opt)  # DeepSpeed may wrap the torch optimizer
        assert type(inner) is torch.optim.AdamW and inner.defaults["fused"] is True, kind
