"""The Python API: `rmkit.load(path_or_url)` -> a reward function for RLHF loops and filters.

    rm = rmkit.load("runs/crft/final")            # or a folder of any HF reward model
    rm = rmkit.load("http://127.0.0.1:8000")      # a running `rmkit serve`, same answers
    rm.score(["Q1", "Q2"], ["A1", "A2"])          # one float per (prompt, response)
    trainer = GRPOTrainer(..., reward_funcs=rm)   # TRL calls rm(prompts=..., completions=..., **columns)

A local model scores exactly as `rmkit score` and `rmkit serve` do (the same
encoding and `score_shard`); responses that share a prompt ride in one record, so the prompt is
computed once (TRL's GRPO sends each prompt num_generations times). Conversational prompts and
completions (lists of {"role", "content"}) are rendered in the paper's `## Human:` /
`## Assistant:` template that rmkit's data readers use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rmkit.data.records import Record
from rmkit.errors import RmkitError

if TYPE_CHECKING:
    from rmkit.serve.registry import Registry

DEFAULT_MAX_BATCH_TOKENS = 8192  # token positions per forward, as `rmkit serve` defaults
REMOTE_CHUNK = 256  # texts per request: the server's default --max-texts
REMOTE_RETRIES = 5  # 503 answers (queue full) retried after Retry-After


# ---- inputs -----------------------------------------------------------------------------------
def _messages(value: list[Any], what: str) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RmkitError(f"{what}: message {i} must be {{'role': str, 'content': str}}",
                             hint="pass strings, or chat messages as TRL's conversational format has them")
        out.append((m["role"], m["content"]))
    return out


def _prompt_text(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        from rmkit.data.readers import chat_prompt

        return chat_prompt(_messages(value, f"prompts[{i}]"))
    raise RmkitError(f"prompts[{i}] must be a string or a list of chat messages, got {type(value).__name__}")


def _response_text(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        from rmkit.data.readers import render_messages

        msgs = _messages(value, f"responses[{i}]")
        if not msgs:
            return ""
        rest = render_messages(msgs[1:])
        return msgs[0][1] + ("\n\n" + rest if rest else "")
    raise RmkitError(f"responses[{i}] must be a string or a list of chat messages, got {type(value).__name__}")


def _pairs(prompts: str | Sequence[Any], responses: Sequence[Any]) -> tuple[list[str], list[str]]:
    if isinstance(responses, str):
        raise RmkitError("responses must be a list of strings, got one string", hint="wrap it: [response]")
    if isinstance(prompts, str):
        prompts = [prompts] * len(responses)
    if len(prompts) != len(responses):
        raise RmkitError(f"{len(prompts)} prompts for {len(responses)} responses",
                         hint="give one prompt per response, or one prompt (a string) for all of them")
    return [_prompt_text(p, i) for i, p in enumerate(prompts)], [_response_text(r, i) for i, r in enumerate(responses)]


def group_by_prompt(prompts: list[str], responses: list[str]) -> tuple[list[Record], list[tuple[int, int]]]:
    """Records (one per distinct prompt, its responses in order) and where each input sits."""
    groups: dict[str, list[str]] = {}
    where: list[tuple[str, int]] = []
    for p, r in zip(prompts, responses):
        groups.setdefault(p, []).append(r)
        where.append((p, len(groups[p]) - 1))
    index = {p: k for k, p in enumerate(groups)}
    records = [Record(p, tuple(rs), tuple(0.0 for _ in rs)) for p, rs in groups.items()]
    return records, [(index[p], k) for p, k in where]


# ---- the reward functions -----------------------------------------------------------------------
class _RewardFunction:
    """Shared call shapes: `score(prompts, responses, domain)` and TRL's reward-function call."""

    domain: str | None

    def __init__(self, domain: str | None) -> None:
        self.domain = domain
        self.__name__ = f"rmkit_{domain or 'default'}"  # TRL names each reward function's log by it

    def _score(self, domain: str | None, prompts: list[str], responses: list[str]) -> list[float]:
        raise NotImplementedError

    def score(self, prompts: str | Sequence[Any], responses: Sequence[Any], domain: str | None = None) -> list[float]:
        """One reward per response; `prompts` is one string for all or one per response."""
        p, r = _pairs(prompts, responses)
        return self._score(domain or self.domain, p, r) if r else []

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None,
                 **kwargs: Any) -> list[float]:
        """TRL's reward-function signature: prompts, completions and the dataset's columns as keyword
        lists. A `domain` column (a name per sample) routes each sample to that domain's model."""
        if prompts is None or completions is None:
            raise RmkitError("a reward function call needs prompts= and completions=",
                             hint="rm(prompts=[...], completions=[...]) or rm.score(prompts, responses)")
        p, r = _pairs(list(prompts), list(completions))
        domains = kwargs.get("domain")
        if not isinstance(domains, list):
            return self._score(domains or self.domain, p, r)
        if len(domains) != len(r):
            raise RmkitError(f"the domain column has {len(domains)} values for {len(r)} completions")
        out = [0.0] * len(r)
        for d in dict.fromkeys(domains):
            idx = [i for i, x in enumerate(domains) if x == d]
            for i, v in zip(idx, self._score(d or self.domain, [p[i] for i in idx], [r[i] for i in idx])):
                out[i] = v
        return out


class LocalRewardModel(_RewardFunction):
    """Reward models loaded in this process (see `rmkit.serve.registry`)."""

    def __init__(self, registry: "Registry", domain: str | None = None,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> None:
        super().__init__(domain)
        self.registry = registry
        self.max_batch_tokens = max_batch_tokens

    @property
    def domains(self) -> list[str]:
        return list(self.registry.domains)

    def _score(self, domain: str | None, prompts: list[str], responses: list[str]) -> list[float]:
        if domain is not None and domain not in self.registry.domains:
            raise RmkitError(f"unknown domain {domain!r}", hint=f"loaded: {', '.join(self.registry.domains)}")
        records, where = group_by_prompt(prompts, responses)
        encoded = [self.registry.encode(domain, rec) for rec in records]
        rewards: list[list[float]] = []
        chunk: list[Any] = []
        tokens = 0
        for e in encoded:  # forwards bounded by the token budget, as the server batches them
            cost = len(e.prompt_ids) + sum(len(x) for x in e.response_ids)
            if chunk and tokens + cost > self.max_batch_tokens:
                rewards += self.registry.score(domain, chunk)
                chunk, tokens = [], 0
            chunk.append(e)
            tokens += cost
        rewards += self.registry.score(domain, chunk)
        return [rewards[rec][k] for rec, k in where]


class RemoteRewardModel(_RewardFunction):
    """A running `rmkit serve`, through its OpenRLHF-style endpoint (prompts sent along, so
    responses of one prompt share it on the server)."""

    def __init__(self, url: str, domain: str | None = None, token: str | None = None, timeout: float = 300.0) -> None:
        super().__init__(domain)
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(REMOTE_RETRIES + 1):
            req = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as res:
                    return json.loads(res.read())
            except urllib.error.HTTPError as e:
                if e.code == 503 and attempt < REMOTE_RETRIES:
                    time.sleep(float(e.headers.get("Retry-After", "1")))
                    continue
                try:
                    err = json.loads(e.read()).get("error", {})
                except ValueError:
                    err = {}
                field = f" ({err['field']})" if err.get("field") else ""
                raise RmkitError(f"{self.url}{path} answered {e.code}{field}: {err.get('message', e.reason)}") from None
            except urllib.error.URLError as e:
                raise RmkitError(f"cannot reach {self.url}: {e.reason}",
                                 hint="is `rmkit serve` running there? check the host and port") from None
        raise AssertionError("unreachable")

    @property
    def domains(self) -> list[str]:
        return [m["id"] for m in self._request("/v1/models")["data"]]

    def _score(self, domain: str | None, prompts: list[str], responses: list[str]) -> list[float]:
        out: list[float] = []
        for k in range(0, len(responses), REMOTE_CHUNK):
            body: dict[str, Any] = {"query": [p + r for p, r in zip(prompts[k:k + REMOTE_CHUNK], responses[k:k + REMOTE_CHUNK])],
                                    "prompts": prompts[k:k + REMOTE_CHUNK]}
            if domain is not None:
                body["domain"] = domain
            out += [float(x) for x in self._request("/get_reward", body)["rewards"]]
        return out


def load(path_or_url: str | Path, domain: str | None = None, domains: dict[str, str] | None = None,
         token: str | None = None, device: Any = None, dtype: Any = None,
         trust_remote_code: bool = False) -> LocalRewardModel | RemoteRewardModel:
    """A reward function over a checkpoint folder (plus `domains`: name -> checkpoint or adapter,
    adapters of one base sharing it) or over the URL of a running `rmkit serve`. `domain` is the
    domain scored when a call names none."""
    target = str(path_or_url)
    if target.startswith(("http://", "https://")):
        if domains:
            raise RmkitError("domains= applies to local folders; a server serves the domains it was started with")
        return RemoteRewardModel(target, domain, token)
    from rmkit.serve.registry import build_registry

    registry = build_registry(target, sorted((domains or {}).items()), device=device, dtype=dtype,
                              trust_remote_code=trust_remote_code)
    if domain is not None and domain not in registry.domains:
        raise RmkitError(f"unknown domain {domain!r}", hint=f"loaded: {', '.join(registry.domains)}")
    return LocalRewardModel(registry, domain)
