"""`rmkit serve` as a real server: a uvicorn process on a free port of 127.0.0.1, started and
stopped by the tests, on the tiny random Llama (a GRFT-like reward checkpoint + two LoRA domain
adapters of it, built by hand as `rmkit train` writes them).

Checked: rewards equal offline scoring (`score_records`, 1e-5 in fp32) for the full checkpoint
and for each adapter domain (against base + that adapter alone, unmerged); the OpenRLHF endpoint;
concurrent mixed-domain requests batched and each answered once with its own rewards; every bad
request named in the issue answered 4xx with the field, the server serving on; 503 + Retry-After
on a full queue; SIGTERM answers the requests in flight, then exits 0.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from rmkit.data.records import Record

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ENC = {"max_length": 48, "truncation_side": "left", "padding_side": "right", "append_eos": False}
DOMAINS = ("business", "literature")
TOKEN = "s3cret"
RECORDS = [
    Record("User: how do I bake bread? Assistant:", (" Mix flour, water and yeast, then bake.", " No idea.", " Bake."),
           (0.0, 0.0, 0.0)),
    Record("User: tell a story. Assistant:", (" A fox met a dog.",), (0.0,)),
    Record("User: " + "a very long question about punctuation " * 6 + "Assistant:", (" yes", " no, that is wrong"),
           (0.0, 0.0)),  # over max_length: truncated from the left, as offline
]


# ---- fixtures shared with test_api.py ---------------------------------------------------------
def make_checkpoints(root: Path, tiny_model_dir: Path) -> dict[str, Path]:
    """grft: a full rmkit reward checkpoint; business, literature: LoRA adapter checkpoints of it."""
    from transformers import AutoTokenizer

    from rmkit.checkpoint import finalize
    from rmkit.lora import adapter_meta, apply_lora, base_fingerprint, count_parameters, write_adapter
    from rmkit.model import RewardModel
    from rmkit.recipe import LoraSpec

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = RewardModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.score.weight.mul_(4.0)  # rewards of order 1
    model.save_pretrained(root / ".tmp-grft", kind="reward", tokenizer=tok)
    base = root / "grft"
    finalize(root / ".tmp-grft", base, {"stage": "grft", "kind": "reward", "domain": None, "step": 1,
                                        "pooling": "last", "encoding": ENC})
    out = {"grft": base}
    spec = LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    for seed, domain in enumerate(DOMAINS, start=1):
        m = RewardModel.from_pretrained(base)
        apply_lora(m, spec, seed=0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # adapter and head moved off their init, as training would
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        tmp = root / f".tmp-{domain}"
        tmp.mkdir()
        write_adapter(tmp, {n: p for n, p in m.named_parameters() if p.requires_grad}, spec, base, m.base_prefix, tok)
        finalize(tmp, root / domain, {"stage": "crft", "domain": domain, "step": 2, "pooling": "last", "encoding": ENC,
                                      "parent": {"path": str(base.resolve()), "stage": "grft"},
                                      **adapter_meta(spec, base, base_fingerprint(base), *count_parameters(m))})
        out[domain] = root / domain
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(5)  # another base, as a plain HF reward folder: served beside, as its own model
    hf = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    hf.save_pretrained(root / "plain")
    tok.save_pretrained(root / "plain")
    out["plain"] = root / "plain"
    return out


def offline(ckpts: dict[str, Path], domain: str, records: list[Record]) -> list[list[float]]:
    """What offline scoring gives: `score_records` on the full checkpoint, or on base + the one
    adapter (peft's LoRA layers, unmerged) for an adapter domain."""
    from rmkit.evaluate import score_records
    from rmkit.inspection import Checkpoint, Encoding, inspect_checkpoint
    from rmkit.scorer import Scorer, load_scorer

    cpu, fp32 = torch.device("cpu"), torch.float32
    if domain in ("default", "plain"):
        folder = ckpts["grft" if domain == "default" else "plain"]
        return score_records(load_scorer(inspect_checkpoint(folder), cpu, fp32), records)[1]
    from transformers import AutoTokenizer

    from rmkit.lora import apply_lora, load_adapter_weights, lora_spec_from_config, read_adapter
    from rmkit.model import RewardModel

    model = RewardModel.from_pretrained(ckpts["grft"])
    config, tensors = read_adapter(ckpts[domain], model.base_prefix)
    apply_lora(model, lora_spec_from_config(config), seed=0)
    load_adapter_weights(model, tensors, ckpts[domain])
    enc = Encoding("prompt+response", ENC["max_length"], "left", "right", False)
    ckpt = Checkpoint(ckpts[domain], domain, "rmkit", {}, enc, None)
    tok = AutoTokenizer.from_pretrained(str(ckpts[domain]))
    return score_records(Scorer(ckpt, model.eval(), tok, int(tok.pad_token_id), cpu, fp32), records)[1]


def close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """An `rmkit serve` subprocess on 127.0.0.1."""

    def __init__(self, args: list[str], token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        cmd = [sys.executable, "-m", "rmkit", "serve", *args, "--port", str(self.port)]
        if token:
            cmd += ["--token", token]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rmkit serve exited {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
            try:
                if self.call("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("rmkit serve did not come up in 120 s")

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
             headers: dict[str, str] | None = None, auth: bool = True) -> tuple[int, Any, dict[str, str]]:
        """(status, parsed JSON, headers); 4xx/5xx come back as values, never as exceptions."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        h = {"Content-Type": "application/json", **(headers or {})}
        if auth and self.token:
            h.setdefault("Authorization", f"Bearer {self.token}")
        req = urllib.request.Request(self.url + path, data=data, headers=h, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as res:
                return res.status, json.loads(res.read()), {k.lower(): v for k, v in res.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def domain_args(ckpts: dict[str, Path], plain: bool = False) -> list[str]:
    args = [str(ckpts["grft"])]
    for d in DOMAINS + (("plain",) if plain else ()):
        args += ["--domain", f"{d}={ckpts[d]}"]
    return args


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("serve-ckpts"), tiny_model_dir)


@pytest.fixture(scope="module")
def server(ckpts: dict[str, Path]) -> Iterator[Server]:
    s = Server(domain_args(ckpts, plain=True) + ["--max-texts", "8", "--max-text-chars", "2000", "--max-body-bytes", "20000",
                                     "--batch-window-ms", "20"], token=TOKEN)
    yield s
    s.stop()


def _score(server: Server, rec: Record, domain: str | None = None) -> tuple[int, Any, dict[str, str]]:
    body: dict[str, Any] = {"prompt": rec.prompt, "responses": list(rec.responses)}
    if domain is not None:
        body["domain"] = domain
    return server.call("POST", "/v1/score", body)


# ---- rewards ----------------------------------------------------------------------------------
@pytest.mark.parametrize("domain", ["default", *DOMAINS, "plain"])
def test_rewards_equal_offline_scoring(server: Server, ckpts: dict[str, Path], domain: str) -> None:
    expected = offline(ckpts, domain, RECORDS)
    for rec, want in zip(RECORDS, expected):
        status, got, _ = _score(server, rec, None if domain == "default" else domain)
        assert status == 200, got
        assert got["domain"] == domain and close(got["rewards"], want), (got, want)
    assert _score(server, RECORDS[2])[1]["truncated"] is True
    assert _score(server, RECORDS[0])[1]["truncated"] is False


def test_adapter_domains_differ_from_the_base(server: Server) -> None:
    rewards = {d: _score(server, RECORDS[0], d)[1]["rewards"] for d in ("default", *DOMAINS)}
    assert not close(rewards["default"], rewards["business"], 1e-3)
    assert not close(rewards["business"], rewards["literature"], 1e-3)


def test_get_reward_is_openrlhf_compatible(server: Server, ckpts: dict[str, Path]) -> None:
    rec = RECORDS[0]
    texts = [rec.prompt + r for r in rec.responses]
    status, got, _ = server.call("POST", "/get_reward", {"query": texts})
    assert status == 200 and set(got) == {"rewards"}
    lone = [Record("", (t,), (0.0,)) for t in texts]  # a full text: a response to an empty prompt
    assert close(got["rewards"], [r[0] for r in offline(ckpts, "default", lone)])
    # OpenRLHF also sends the prompts: then each query is split there and equals /v1/score
    status, got, _ = server.call("POST", "/get_reward", {"query": texts, "prompts": [rec.prompt] * 3,
                                                         "labels": ["x"] * 3, "domain": "business"})
    assert status == 200 and close(got["rewards"], _score(server, rec, "business")[1]["rewards"])


def test_models_lists_each_domain_with_its_lineage(server: Server, ckpts: dict[str, Path]) -> None:
    from rmkit.lora import base_fingerprint

    status, got, _ = server.call("GET", "/v1/models")
    assert status == 200
    models = {m["id"]: m for m in got["data"]}
    assert list(models) == ["default", *DOMAINS, "plain"]
    assert models["default"]["stage"] == "grft" and models["default"]["kind"] == "rmkit"
    fp = base_fingerprint(ckpts["grft"])
    for d in DOMAINS:
        m = models[d]
        assert m["kind"] == "adapter" and m["stage"] == "crft" and m["domain"] == d
        assert m["base"] == {"path": str(ckpts["grft"].resolve()), "fingerprint": fp}
        assert m["model"] == models["default"]["model"]  # one copy of the base
        assert set(m["shares_base_with"]) == {"default", *DOMAINS} - {d}
    assert models["plain"]["kind"] == "hf" and models["plain"]["model"] != models["default"]["model"]
    assert models["plain"]["shares_base_with"] == []
    health = server.call("GET", "/health", auth=False)[1]
    assert health["status"] == "ok" and health["domains"] == ["default", *DOMAINS, "plain"]
    # one copy of the shared base (+ two small adapters and heads) and one of the other model
    one_model = (ckpts["grft"] / "model.safetensors").stat().st_size
    assert 1.8 * one_model <= health["weights_bytes"] < 2.3 * one_model, (health["weights_bytes"], one_model)


def test_concurrent_mixed_domain_requests_are_batched_and_each_answered_once(server: Server) -> None:
    """24 requests at once over three domains: every answer is the rewards of its own request
    (as scored alone, sequentially), and the server ran fewer batches than requests."""
    jobs = [(RECORDS[k % 3], ("default", *DOMAINS)[k % 3 if k % 2 else (k + 1) % 3]) for k in range(24)]
    alone = {(r.prompt, d): _score(server, r, d)[1]["rewards"] for r, d in set(jobs)}
    before = server.call("GET", "/health", auth=False)[1]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda job: _score(server, *job), jobs))
    after = server.call("GET", "/health", auth=False)[1]
    for (rec, d), (status, got, _) in zip(jobs, answers):
        assert status == 200 and got["domain"] == d and close(got["rewards"], alone[(rec.prompt, d)]), got
    assert after["requests"] - before["requests"] == 24
    assert after["batches"] - before["batches"] < 24


# ---- bad requests -----------------------------------------------------------------------------
BAD: dict[str, tuple[str, Any, int, str | None, str]] = {
    # name: (path, body (bytes = raw), status, field, message fragment)
    "malformed json": ("/v1/score", b'{"prompt": "x", "responses": [', 400, "body", "malformed JSON"),
    "empty body": ("/v1/score", b"", 400, "body", "empty body"),
    "body not an object": ("/v1/score", ["x"], 422, "body", "must be a JSON object"),
    "missing prompt": ("/v1/score", {"responses": ["a"]}, 422, "prompt", "missing"),
    "prompt not a string": ("/v1/score", {"prompt": 3, "responses": ["a"]}, 422, "prompt", "must be a string"),
    "missing responses": ("/v1/score", {"prompt": "p"}, 422, "responses", "missing"),
    "responses not a list": ("/v1/score", {"prompt": "p", "responses": "a"}, 422, "responses", "must be a list"),
    "empty responses": ("/v1/score", {"prompt": "p", "responses": []}, 422, "responses", "must not be empty"),
    "response not a string": ("/v1/score", {"prompt": "p", "responses": ["a", None]}, 422, "responses[1]",
                              "must be a string, got NoneType"),
    "too many responses": ("/v1/score", {"prompt": "p", "responses": ["a"] * 9}, 422, "responses",
                           "9 items is over the limit of 8"),
    "response over the limit": ("/v1/score", {"prompt": "p", "responses": ["a", "b" * 2001]}, 422, "responses[1]",
                                "2001 characters is over the limit of 2000"),
    "prompt over the limit": ("/v1/score", {"prompt": "p" * 2001, "responses": ["a"]}, 422, "prompt", "over the limit"),
    "unknown domain": ("/v1/score", {"prompt": "p", "responses": ["a"], "domain": "law"}, 422, "domain",
                       "unknown domain 'law'; served: default, business, literature, plain"),
    "domain not a string": ("/v1/score", {"prompt": "p", "responses": ["a"], "domain": 1}, 422, "domain",
                            "must be a string"),
    "unknown field": ("/v1/score", {"prompt": "p", "responses": ["a"], "temperature": 1}, 422, "temperature",
                      "unknown field"),
    "body over the size limit": ("/v1/score", {"prompt": "p", "responses": ["a"], "pad": "z" * 20000}, 413, "body",
                                 "over the limit of 20000 bytes"),
    "query missing": ("/get_reward", {"queries": ["a"]}, 422, "query", "missing"),
    "query empty": ("/get_reward", {"query": []}, 422, "query", "must not be empty"),
    "query item not a string": ("/get_reward", {"query": ["a", 2]}, 422, "query[1]", "must be a string"),
    "too many queries": ("/get_reward", {"query": ["a"] * 9}, 422, "query", "over the limit of 8"),
    "prompts of another length": ("/get_reward", {"query": ["a", "b"], "prompts": ["a"]}, 422, "prompts",
                                  "1 prompts for 2 queries"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_4xx_naming_the_field_and_the_server_serves_on(server: Server, case: str) -> None:
    path, body, status, field, fragment = BAD[case]
    raw = body if isinstance(body, bytes) else None
    got_status, got, _ = server.call("POST", path, None if raw is not None else body, raw=raw)
    assert got_status == status, got
    assert got["error"]["field"] == field and fragment in got["error"]["message"], got
    assert _score(server, RECORDS[1])[0] == 200


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic s3cret"])
def test_wrong_or_missing_token_is_401(server: Server, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    status, got, h = server.call("POST", "/v1/score", {"prompt": "p", "responses": ["a"]}, headers=headers,
                                 auth=header is not None)
    assert status == 401 and got["error"]["field"] == "Authorization" and h.get("www-authenticate") == "Bearer"
    assert server.call("GET", "/v1/models", auth=False)[0] == 401
    assert server.call("GET", "/health", auth=False)[0] == 200  # health stays open for probes


def test_unknown_route_and_method_are_json_errors(server: Server) -> None:
    assert server.call("GET", "/v2/nothing")[:2] == (404, {"error": {"field": None, "message": "Not Found"}})
    assert server.call("GET", "/v1/score")[0] == 405


def test_binds_to_127_0_0_1_by_default() -> None:
    from typer.testing import CliRunner

    from rmkit.cli import app

    text = CliRunner().invoke(app, ["serve", "--help"]).output
    assert "127.0.0.1" in text


# ---- a full queue, and SIGTERM (one small server, the last tests of this file) -----------------
@pytest.fixture(scope="module")
def small(ckpts: dict[str, Path]) -> Iterator[Server]:
    """At most 2 requests admitted; the first of a batch waits 1.5 s for company."""
    s = Server([str(ckpts["grft"]), "--max-pending", "2", "--batch-window-ms", "1500"])
    yield s
    s.stop()


def test_full_queue_answers_503_with_retry_after(small: Server) -> None:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _score(small, RECORDS[0]), range(6)))
    ok = [a for a in answers if a[0] == 200]
    full = [a for a in answers if a[0] == 503]
    assert len(ok) == 2 and len(full) == 4, [a[0] for a in answers]
    for _, got, headers in full:
        assert int(headers["retry-after"]) >= 1 and "queue is full" in got["error"]["message"]
    assert all(a[1]["rewards"] == ok[0][1]["rewards"] for a in ok)
    assert _score(small, RECORDS[0])[0] == 200  # admitted again once the queue drained
    assert small.call("GET", "/health")[1]["rejected_full"] == 4


def test_sigterm_answers_requests_in_flight_then_exits_cleanly(small: Server) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_score, small, RECORDS[k]) for k in (0, 1)]
        deadline = time.monotonic() + 10
        while small.call("GET", "/health")[1]["pending"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert small.call("GET", "/health")[1]["pending"] == 2  # both waiting in the 1.5 s window
        small.proc.send_signal(signal.SIGTERM)
        answers = [f.result(timeout=30) for f in futures]
    assert [a[0] for a in answers] == [200, 200] and len(answers[0][1]["rewards"]) == 3
    code, err = small.stop()
    assert code == 0, err[-2000:]
    assert "drained" in err and "Traceback" not in err
    with pytest.raises(OSError):
        small.call("GET", "/health")


# ---- Ctrl-C, and mistakes on the command line -------------------------------------------------
def test_ctrl_c_answers_the_request_in_flight_then_exits(ckpts: dict[str, Path]) -> None:
    """Exit 0, or 130 where uvicorn re-raises the SIGINT it handled (the CLI's code for Ctrl-C)."""
    s = Server([str(ckpts["grft"]), "--batch-window-ms", "1500"])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_score, s, RECORDS[1])
        deadline = time.monotonic() + 10
        while s.call("GET", "/health")[1]["pending"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGINT)
        status, got, _ = future.result(timeout=30)
    assert status == 200 and len(got["rewards"]) == 1
    code, err = s.stop()
    assert code in (0, 130) and "drained" in err and "Traceback" not in err, err[-2000:]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rmkit", "serve", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["no such folder", "domain without =", "bad domain name", "domain twice",
                                  "moved base", "port 0"])
def test_command_line_mistakes_exit_2_before_loading(case: str, ckpts: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    grft, business = str(ckpts["grft"]), str(ckpts["business"])
    args, message = {
        "no such folder": ([str(tmp_path / "nope")], "no such checkpoint folder"),
        "domain without =": ([grft, "--domain", business], "is not NAME=CKPT"),
        "bad domain name": ([grft, "--domain", f"my.domain={business}"], "must start with a letter"),
        "domain twice": ([grft, "--domain", f"b={business}", "--domain", f"b={business}"], "domain 'b' is given twice"),
        "moved base": (None, "does not exist"),
        "port 0": ([grft, "--port", "0"], "--port must be at least 1"),
    }[case]
    if case == "moved base":  # an adapter whose recorded base is gone is refused by name
        copy = tmp_path / "copy"
        shutil.copytree(ckpts["grft"], copy / "grft")
        shutil.copytree(ckpts["business"], copy / "business")
        meta = json.loads((copy / "business" / "meta.json").read_text())
        meta["base"]["path"] = str(tmp_path / "gone")
        (copy / "business" / "meta.json").write_text(json.dumps(meta))
        args = [str(copy / "grft"), "--domain", f"business={copy / 'business'}"]
    res = _cli(*args)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
