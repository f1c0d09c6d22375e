"""The HTTP routes of `rmkit serve` (FastAPI): scoring, OpenRLHF's remote RM endpoint, health, models.

Every bad request is answered 4xx with one JSON shape, `{"error": {"field", "message"}}`, and
the server keeps serving: 400 malformed JSON, 401 missing or wrong bearer token, 413 a body over
the size limit, 422 a field that is missing, of the wrong type, empty, too long, or an unknown
domain, 503 (with Retry-After) when the bounded queue is full. Bodies are parsed by hand, not by
pydantic, so each message names the exact field (`responses[3]`) and the limits are checked
before anything is tokenized.

Texts longer than the checkpoint's max_length are truncated exactly as offline scoring
truncates them (`rmkit score`), and the answer says so (`truncated`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import sys
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rmkit import __version__
from rmkit.data.records import Record
from rmkit.serve.batcher import Batcher, QueueFull, group_by_domain
from rmkit.serve.registry import Registry


@dataclass
class ServeConfig:
    """Limits and batching settings (the CLI flags of `rmkit serve`)."""

    max_pending: int = 256  # admitted, unanswered requests; past it: 503
    window_ms: float = 5.0  # how long the first request of a batch waits for company
    max_batch_tokens: int = 8192  # token positions per forward (a larger lone request runs alone)
    batch_size: int | None = None  # records per forward inside a batch; None = the whole batch
    max_texts: int = 256  # responses per /v1/score, queries per /get_reward
    max_text_chars: int = 100_000  # characters per prompt or response
    max_body_bytes: int = 4 << 20
    token: str | None = None  # bearer token; None = no auth (fine on 127.0.0.1)
    drain_s: float = 30.0  # how long SIGTERM waits for in-flight requests


class BadRequest(Exception):
    """A client mistake: HTTP `status`, the offending `field`, and what is wrong with it."""

    def __init__(self, status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers


def _error(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status, headers=headers)


# ---- request parsing --------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, refusing anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, "body", f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, "body", f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise BadRequest(400, "body", "empty body: send a JSON object")
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, "body", f"malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest(422, "body", f"the body must be a JSON object, got {type(value).__name__}")
    return value


def _text(value: Any, field: str, limit: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise BadRequest(422, field, f"must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise BadRequest(422, field, f"text of {len(value)} characters is over the limit of {limit}")
    if not allow_empty and not value:
        raise BadRequest(422, field, "must not be empty")
    return value


def _texts(body: dict[str, Any], key: str, cfg: ServeConfig) -> list[str]:
    if key not in body:
        raise BadRequest(422, key, "missing (a list of strings)")
    value = body[key]
    if not isinstance(value, list):
        raise BadRequest(422, key, f"must be a list of strings, got {type(value).__name__}")
    if not value:
        raise BadRequest(422, key, "must not be empty")
    if len(value) > cfg.max_texts:
        raise BadRequest(422, key, f"{len(value)} items is over the limit of {cfg.max_texts} per request")
    return [_text(v, f"{key}[{i}]", cfg.max_text_chars) for i, v in enumerate(value)]


def _domain(body: dict[str, Any], registry: Registry) -> str:
    name = body.get("domain")
    if name is None:
        return registry.default
    if not isinstance(name, str):
        raise BadRequest(422, "domain", f"must be a string, got {type(name).__name__}")
    if name not in registry.domains:
        raise BadRequest(422, "domain", f"unknown domain {name!r}; served: {', '.join(registry.domains)}")
    return name


def parse_score(body: dict[str, Any], registry: Registry, cfg: ServeConfig) -> tuple[str, Record]:
    """{"prompt", "responses", "domain"?} -> (domain, one record: the prompt is computed once)."""
    unknown = sorted(set(body) - {"prompt", "responses", "domain"})
    if unknown:
        raise BadRequest(422, unknown[0], "unknown field; /v1/score takes prompt, responses, domain")
    if "prompt" not in body:
        raise BadRequest(422, "prompt", "missing (a string)")
    prompt = _text(body["prompt"], "prompt", cfg.max_text_chars)
    responses = _texts(body, "responses", cfg)
    domain = _domain(body, registry)
    return domain, Record(prompt, tuple(responses), tuple(0.0 for _ in responses))


def parse_get_reward(body: dict[str, Any], registry: Registry, cfg: ServeConfig) -> tuple[str, list[Record], list[tuple[int, int]]]:
    """OpenRLHF's {"query": [full text], "prompts"?: [prompt], "labels"?: ...} -> records, and
    where each query's reward sits ((record, response)). With `prompts` (OpenRLHF sends them), a
    query that starts with its prompt is split there and queries of one prompt share one record,
    so the answer equals /v1/score; without them each full text is a response to an empty prompt
    (as `rmkit score` scores {"prompt": "", "response": text})."""
    queries = _texts(body, "query", cfg)
    prompts: list[str] | None = None
    if body.get("prompts") is not None:
        prompts = _texts(body, "prompts", cfg)
        if len(prompts) != len(queries):
            raise BadRequest(422, "prompts", f"{len(prompts)} prompts for {len(queries)} queries; give one per query")
    domain = _domain(body, registry)
    groups: dict[str, list[str]] = {}
    where: list[tuple[str, int]] = []
    for i, q in enumerate(queries):
        p = prompts[i] if prompts is not None and q.startswith(prompts[i]) else ""
        groups.setdefault(p, []).append(q[len(p):])
        where.append((p, len(groups[p]) - 1))
    order = {p: k for k, p in enumerate(groups)}
    records = [Record(p, tuple(rs), tuple(0.0 for _ in rs)) for p, rs in groups.items()]
    return domain, records, [(order[p], k) for p, k in where]


# ---- the app ----------------------------------------------------------------------------------
def create_app(registry: Registry, cfg: ServeConfig) -> FastAPI:
    """The FastAPI app over loaded models; the batcher lives for the app's lifespan."""
    state: dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(lambda jobs: group_by_domain(registry, jobs, cfg.batch_size), cfg.max_pending,
                          cfg.window_ms / 1000.0, cfg.max_batch_tokens)
        batcher.start()
        state["batcher"] = batcher
        try:
            yield
        finally:  # uvicorn has waited for in-flight requests; answer anything still queued
            await batcher.stop()
            print(f"rmkit serve: drained; {batcher.stats.requests} requests answered, "
                  f"{batcher.stats.rejected_full} refused (queue full)", file=sys.stderr, flush=True)

    app = FastAPI(title="rmkit serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(BadRequest)
    async def _bad(_: Request, e: BadRequest) -> JSONResponse:
        return _error(e.status, e.field, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, None, str(e.detail), getattr(e, "headers", None))

    def authorize(request: Request) -> None:
        if cfg.token is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {cfg.token}".encode()):
            raise BadRequest(401, "Authorization", "missing or wrong bearer token",
                             {"WWW-Authenticate": "Bearer"})

    async def score(domain: str, records: list[Record]) -> tuple[list[list[float]], bool]:
        encoded = [registry.encode(domain, r) for r in records]
        tokens = sum(len(e.prompt_ids) + sum(len(x) for x in e.response_ids) for e in encoded)
        try:
            rewards = await state["batcher"].submit(domain, encoded, tokens)
        except QueueFull as e:
            raise BadRequest(503, None, f"the queue is full ({cfg.max_pending} requests waiting); retry later",
                             {"Retry-After": str(e.retry_after)}) from None
        return rewards, any(e.truncated for e in encoded)

    @app.post("/v1/score")
    async def v1_score(request: Request) -> dict[str, Any]:
        authorize(request)
        body = await read_json(request, cfg.max_body_bytes)
        domain, record = parse_score(body, registry, cfg)
        rewards, truncated = await score(domain, [record])
        d = registry.domains[domain]
        return {"rewards": rewards[0], "domain": domain, "model": d.lineage["path"], "truncated": truncated}

    @app.post("/get_reward")
    async def get_reward(request: Request) -> dict[str, Any]:
        authorize(request)
        body = await read_json(request, cfg.max_body_bytes)
        domain, records, where = parse_get_reward(body, registry, cfg)
        rewards, _ = await score(domain, records)
        return {"rewards": [rewards[r][k] for r, k in where]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        b = state.get("batcher")
        stats = b.stats if b is not None else None
        return {"status": "ok", "version": __version__, "domains": list(registry.domains),
                "pending": b.pending if b else 0, "max_pending": cfg.max_pending,
                "requests": stats.requests if stats else 0, "batches": stats.batches if stats else 0,
                "mean_batch": round(stats.forwards_jobs / stats.batches, 2) if stats and stats.batches else None,
                "rejected_full": stats.rejected_full if stats else 0,
                "device": str(registry.device), "weights_bytes": registry.memory_bytes()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": registry.describe()}

    return app


class _Stopped(Exception):
    """SIGTERM after the drain: uvicorn re-raises the signal it handled once it has shut down."""


def _stopped(signum: int, frame: Any) -> None:
    raise _Stopped()


def run(registry: Registry, cfg: ServeConfig, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C; both stop accepting, answer in-flight requests, then exit
    (SIGTERM with status 0; Ctrl-C as KeyboardInterrupt, which the CLI turns into 130)."""
    import signal
    import threading

    import uvicorn

    app = create_app(registry, cfg)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=cfg.drain_s, lifespan="on")
    server = uvicorn.Server(config)
    print(f"rmkit serve: {len(registry.domains)} domain(s) [{', '.join(registry.domains)}] on "
          f"http://{host}:{port} (POST /v1/score, POST /get_reward, GET /health, GET /v1/models)",
          file=sys.stderr, flush=True)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped) if main else None
    try:
        server.run()
    except _Stopped:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
