"""Recipe schema: every shipped recipe validates; errors are all reported, with hints."""

from __future__ import annotations

from pathlib import Path

import pytest

from rmkit.errors import RmkitError
from rmkit.recipe import RECIPES_DIR, Recipe, apply_overrides, load_recipe, parse_set
from rmkit.train.schedule import lr_lambda, micro_batches, step_records, total_steps

SHIPPED = sorted(RECIPES_DIR.rglob("*.yaml"))


def test_there_are_shipped_recipes() -> None:
    names = {p.relative_to(RECIPES_DIR).as_posix() for p in SHIPPED}
    assert {"blt.yaml", "grft.yaml", "crft.yaml", "cpu/blt.yaml", "cpu/grft.yaml", "cpu/crft.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(RECIPES_DIR).as_posix())
def test_shipped_recipe_validates(path: Path) -> None:
    r = load_recipe(path)
    assert r.stage in ("blt", "grft", "crft")
    # every shipped recipe has a whole number of micro-batches per step on 1 process
    assert r.grad_accum(1) * r.train.micro_batch == r.train.global_batch


def test_paper_defaults() -> None:
    g = load_recipe(RECIPES_DIR / "grft.yaml")
    c = load_recipe(RECIPES_DIR / "crft.yaml")
    assert (g.train.lr, g.train.warmup_steps, g.train.global_batch) == (1e-6, 100, 64)
    assert (c.train.lr, c.train.warmup_steps, c.train.global_batch) == (1e-7, 0, 256)
    for r in (g, c):
        assert (r.data.max_length, r.data.truncation_side, r.model.pooling) == (512, "left", "last")


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_all_errors_at_once_with_suggestions(tmp_path: Path) -> None:
    p = _write(tmp_path, """
stage: grft
model: {path: x, poolng: last}
data:
  train: [{path: a.json, wieght: 1}]
  max_length: 4
train: {lr: -1, global_batch: 8}
""")
    with pytest.raises(RmkitError) as e:
        load_recipe(p)
    msg = e.value.render()
    assert "4 problems in the recipe" in msg
    assert "model.poolng: unknown key (did you mean 'pooling'?)" in msg
    assert "data.train.0.wieght: unknown key (did you mean 'weight'?)" in msg
    assert "data.max_length: Input should be greater than 8 (got 4)" in msg
    assert "train.lr: Input should be greater than 0 (got -1)" in msg


def test_weights_all_or_none(tmp_path: Path) -> None:
    p = _write(tmp_path, """
stage: grft
model: {path: x}
data: {train: [{path: a, weight: 1}, {path: b}]}
train: {lr: 1e-5, global_batch: 8}
""")
    with pytest.raises(RmkitError, match="weights must be given for all train sources or for none"):
        load_recipe(p)


def test_crft_needs_domain_and_set_overrides(tmp_path: Path) -> None:
    text = """
stage: crft
model: {path: x}
data: {train: [{path: a}]}
train: {lr: 1e-5, global_batch: 8, output_dir: "runs/crft-{domain}"}
"""
    p = _write(tmp_path, text)
    with pytest.raises(RmkitError, match="a crft recipe needs a domain"):
        load_recipe(p)
    r = load_recipe(p, ["train.lr=3e-6", "data.train.0.weight=0.5", "launch.gpus=2"], domain="business")
    assert (r.domain, r.train.lr, r.data.train[0].weight, r.launch.gpus) == ("business", 3e-6, 0.5, 2)
    with pytest.raises(RmkitError, match="has no item 3"):
        load_recipe(p, ["data.train.3.weight=1"], domain="business")


def test_grad_accum_is_derived_and_checked(tmp_path: Path) -> None:
    r = load_recipe(RECIPES_DIR / "grft.yaml")  # global 64, micro 4
    assert r.grad_accum(1) == 16 and r.grad_accum(8) == 2
    with pytest.raises(RmkitError, match="not divisible by micro_batch x processes = 4 x 5 = 20"):
        r.grad_accum(5)


def test_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path, """
stage: grft
model: {path: "${MODEL_DIR:-fallback}/m"}
data: {train: [{path: "${NEEDED}/a.json"}]}
train: {lr: 1e-5, global_batch: 8}
""")
    with pytest.raises(RmkitError, match="environment variable NEEDED is not set"):
        load_recipe(p)
    monkeypatch.setenv("NEEDED", "/d")
    r = load_recipe(p)
    assert r.model.path == "fallback/m" and r.data.train[0].path == "/d/a.json"


def test_stage_mismatch(tmp_path: Path) -> None:
    with pytest.raises(RmkitError, match="recipe is for stage 'grft', but `rmkit train crft` was run"):
        load_recipe(RECIPES_DIR / "grft.yaml", stage="crft")


def test_parse_set_values() -> None:
    assert parse_set(["a.b=1e-6", "c=true", "d=[x, y]", "e=text"]) == [("a.b", 1e-6), ("c", True), ("d", ["x", "y"]), ("e", "text")]
    with pytest.raises(RmkitError, match="is not key=value"):
        parse_set(["nokey"])
    assert apply_overrides({"a": {"b": 1}}, [("a.c", 2)]) == {"a": {"b": 1, "c": 2}}


def test_schedule_shapes() -> None:
    # warmup 2 of 10 steps, cosine to 0
    assert [round(lr_lambda(s, 10, 2, "cosine", 0.0), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_lambda(5, 10, 0, "linear", 0.0) == 0.5
    assert lr_lambda(7, 10, 0, "constant", 0.0) == 1.0


def test_data_order_is_a_function_of_seed_and_step() -> None:
    a = [step_records(s, 20, 4, seed=1) for s in range(5)]
    assert sorted(sum(a, [])) == list(range(20))  # one epoch covers every record once
    assert step_records(3, 20, 4, seed=1) == a[3]
    assert step_records(5, 20, 4, seed=1) != a[0]  # next epoch: a new permutation
    assert total_steps(20, 4, 2.0, None) == 10 and total_steps(20, 4, 1, 3) == 3


def test_micro_batches_group_by_length() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    ids = list(range(8))
    r0 = micro_batches(ids, lengths, micro=2, world=2, rank=0)
    r1 = micro_batches(ids, lengths, micro=2, world=2, rank=1)
    assert r0 == [[2, 6], [7, 3]] and r1 == [[4, 0], [5, 1]]


def test_data_template_is_removed(tmp_path: Path) -> None:
    """data.template is gone: any value but "raw" is refused naming the key and the fix; "raw",
    which every resolved recipe saved so far holds, still loads (runs resume, checkpoints
    evaluate) and is no longer dumped."""
    import yaml

    from rmkit.recipe import dump_recipe

    base = "stage: grft\nmodel: {path: x}\ntrain: {lr: 1e-5, global_batch: 8}\n"
    p = _write(tmp_path, base + "data: {train: [{path: a}], template: hh}\n")
    with pytest.raises(RmkitError) as e:
        load_recipe(p)
    assert e.value.problem == (
        "1 problem in the recipe:\n  data.template: removed: prompts are rendered by the data readers, DSP "
        "queries and chat messages as '## Human:' / '## Assistant:', text-score and chosen-rejected dialogues "
        "as they are written; delete this line")
    old = load_recipe(_write(tmp_path, base + "data: {train: [{path: a}], template: raw}\n"))
    assert "template" not in old.model_dump()["data"] and "template" not in dump_recipe(old)
    saved = yaml.safe_load(dump_recipe(old))
    saved["data"]["template"] = "raw"  # a run folder's recipe.yaml written before the key went
    assert Recipe.model_validate(saved) == old
