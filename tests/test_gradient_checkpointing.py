"""`train.gradient_checkpointing`: really on in the decoder (every layer, or every N-th), and the
same step as without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rmkit.data.records import Record, write_records


def _runner(tmp: Path, model: Path, checkpointing: bool | int):  # type: ignore[no-untyped-def]
    from rmkit.recipe import Recipe
    from rmkit.train.loop import Trainer
    from rmkit.train.rundir import plan_run, write_run_dir

    data = tmp / "pairs.jsonl"
    write_records(data, [Record(f"question {i}? ", (" yes that is right", " no"), (1.0, 0.0)) for i in range(4)])
    recipe = Recipe.model_validate({
        "stage": "grft", "model": {"path": str(model)},
        "data": {"train": [{"path": str(data)}], "max_length": 32},
        "loss": {"imitation_weight": 0.5},
        "train": {"lr": 1e-2, "schedule": "constant", "global_batch": 4, "micro_batch": 2, "max_steps": 1,
                  "seed": 0, "gradient_checkpointing": checkpointing, "output_dir": str(tmp / f"run-{checkpointing}")},
        "launch": {"deepspeed": "zero0", "gpus": 1, "precision": "fp32"},
    })
    plan = plan_run(recipe)
    write_run_dir(recipe, plan)
    runner = Trainer(plan.run_dir, engine="local")
    runner.engine.train()
    return runner


def test_gradient_checkpointing_is_on_and_gives_the_same_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    results = {}
    for flag, layers in ((False, [False, False]), (True, [True, True]), (2, [True, False])):
        runner = _runner(tmp_path, tiny_model_dir, flag)
        assert runner.model.base_model.gradient_checkpointing is bool(flag)
        assert [layer.gradient_checkpointing for layer in runner.model.base_model.layers] == layers
        out = runner.train_step(0)
        results[flag] = (out["loss"], {n: p.detach().clone() for n, p in runner.model.named_parameters()})
    for flag in (True, 2):
        assert results[flag][0] == results[False][0]
        for name, p in results[False][1].items():
            torch.testing.assert_close(results[flag][1][name], p, atol=1e-6, rtol=1e-5, msg=name)
    first = next(iter(results[False][1]))
    assert not torch.equal(results[False][1][first], _fresh(tiny_model_dir, first))  # the step changed the weights


def test_gradient_checkpointing_takes_a_layer_period_of_at_least_one() -> None:
    from rmkit.recipe import TrainSpec

    assert TrainSpec(lr=1.0, global_batch=1, gradient_checkpointing=3).checkpoint_every() == 3
    assert TrainSpec(lr=1.0, global_batch=1, gradient_checkpointing=True).checkpoint_every() == 1
    assert TrainSpec(lr=1.0, global_batch=1).checkpoint_every() == 0
    with pytest.raises(ValueError, match="takes true, false, or N >= 1 to recompute every N-th decoder layer"):
        TrainSpec(lr=1.0, global_batch=1, gradient_checkpointing=0)


def _fresh(model: Path, name: str) -> torch.Tensor:
    from rmkit.model import RewardModel

    return dict(RewardModel.from_pretrained(model).named_parameters())[name].detach()
