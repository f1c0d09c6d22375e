"""The Python API: `rmkit.load(path_or_url)`, `rm.score(...)`, and the TRL reward-function call.

The checkpoints are test_serve.py's (a full reward checkpoint + two LoRA domain adapters of it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from test_serve import DOMAINS, RECORDS, Server, close, domain_args, make_checkpoints, offline

from rmkit.data.records import Record
from rmkit.errors import RmkitError


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("api-ckpts"), tiny_model_dir)


@pytest.fixture(scope="module")
def rm(ckpts: dict[str, Path]) -> Any:
    import rmkit

    return rmkit.load(ckpts["grft"], domains={d: str(ckpts[d]) for d in DOMAINS})


def _flat(records: list[Record]) -> tuple[list[str], list[str]]:
    prompts = [r.prompt for r in records for _ in r.responses]
    return prompts, [x for r in records for x in r.responses]


def test_import_rmkit_does_not_import_torch() -> None:
    code = ("import sys, rmkit; assert callable(rmkit.load); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'fastapi', 'rmkit.api') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


@pytest.mark.parametrize("domain", ["default", *DOMAINS])
def test_score_equals_offline_scoring(rm: Any, ckpts: dict[str, Path], domain: str) -> None:
    prompts, responses = _flat(RECORDS)
    got = rm.score(prompts, responses, domain=None if domain == "default" else domain)
    want = [x for r in offline(ckpts, domain, RECORDS) for x in r]
    assert all(isinstance(x, float) for x in got) and close(got, want)


def test_one_prompt_for_many_responses_and_a_small_token_budget(rm: Any) -> None:
    rec = RECORDS[0]
    want = rm.score([rec.prompt] * 3, list(rec.responses))
    assert close(rm.score(rec.prompt, list(rec.responses)), want)
    budget, rm.max_batch_tokens = rm.max_batch_tokens, 8  # one record per forward
    try:
        prompts, responses = _flat(RECORDS)
        assert close(rm.score(prompts, responses), [x for r in RECORDS for x in rm.score(r.prompt, list(r.responses))])
    finally:
        rm.max_batch_tokens = budget


def test_called_the_way_trl_grpo_calls_a_reward_function(rm: Any) -> None:
    """GRPOTrainer: reward_func(prompts=, completions=, completion_ids=, **dataset columns, trainer_state=)
    -> list[float], and it names the function's log by `__name__`. A `domain` column routes samples."""
    prompts, completions = _flat(RECORDS)
    domains = ["business", "literature", "default", "business", "literature", "default"]
    rewards = rm(prompts=prompts, completions=completions, completion_ids=[[1, 2]] * len(prompts),
                 trainer_state=None, domain=domains, answer=["x"] * len(prompts))
    assert isinstance(rewards, list) and len(rewards) == len(prompts) and all(isinstance(x, float) for x in rewards)
    for i, d in enumerate(domains):
        assert close([rewards[i]], rm.score([prompts[i]], [completions[i]], domain=d))
    assert rm(prompts=prompts, completions=completions) == rm.score(prompts, completions)
    assert isinstance(rm.__name__, str) and rm.__name__


def test_conversational_prompts_use_the_papers_template(rm: Any) -> None:
    prompt = [{"role": "user", "content": "how do I bake bread?"}]
    completion = [{"role": "assistant", "content": "Mix flour and yeast."}]
    got = rm(prompts=[prompt], completions=[completion])
    assert close(got, rm.score(["## Human:\nhow do I bake bread?\n\n## Assistant:\n"], ["Mix flour and yeast."]))


@pytest.mark.parametrize("call, message", [
    (lambda rm: rm.score(["a", "b"], ["x"]), "2 prompts for 1 responses"),
    (lambda rm: rm.score("a", "x"), "responses must be a list"),
    (lambda rm: rm.score(["a"], ["x"], domain="law"), "unknown domain 'law'"),
    (lambda rm: rm.score([3], ["x"]), "prompts[0] must be a string or a list of chat messages"),
    (lambda rm: rm(prompts=["a"]), "needs prompts= and completions="),
])
def test_mistakes_are_rmkit_errors(rm: Any, call: Any, message: str) -> None:
    with pytest.raises(RmkitError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(rm)


def test_load_refuses_a_folder_that_is_not_a_reward_model(tiny_model_dir: Path) -> None:
    import rmkit

    with pytest.raises(RmkitError, match="not a sequence-classification reward model"):
        rmkit.load(tiny_model_dir)


@pytest.fixture(scope="module")
def server(ckpts: dict[str, Path]) -> Iterator[Server]:
    s = Server(domain_args(ckpts), token="t0k")
    yield s
    s.stop()


def test_a_served_model_answers_like_the_local_one(server: Server, rm: Any) -> None:
    import rmkit

    remote = rmkit.load(server.url, token="t0k")
    assert remote.domains == ["default", *DOMAINS]
    prompts, responses = _flat(RECORDS)
    for d in (None, *DOMAINS):
        assert close(remote.score(prompts, responses, domain=d), rm.score(prompts, responses, domain=d))
    assert close(remote(prompts=prompts, completions=responses), rm(prompts=prompts, completions=responses))
    with pytest.raises(RmkitError, match=r"answered 422 \(domain\): unknown domain 'law'"):
        remote.score(["a"], ["b"], domain="law")
    with pytest.raises(RmkitError, match="answered 401"):
        rmkit.load(server.url).score(["a"], ["b"])
