"""Server-side batching: a bounded queue, a short batching window, a token budget per forward.

Requests arrive on the event loop already encoded (token ids). One asyncio task takes the first
waiting job, then keeps taking jobs for at most `window_s` or until the next job would push the
batch past `max_tokens`, and hands the batch to ONE model thread. While that thread computes,
new jobs queue up, so under load every forward is full and under light load a lone request
waits at most `window_s`. A job larger than the budget alone is run alone (never split, never
refused for that).

The bound counts every admitted job that is not answered yet (queued, being batched or being
scored): past `max_pending` a request is refused at once (`QueueFull`, HTTP 503) instead of
growing memory and latency without bound. `stop()` answers every admitted job before it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# One batch: [(domain, [encoded record, ...]), ...] -> rewards per job, per record, per response.
ScoreFn = Callable[[list[tuple[str | None, list[Any]]]], list[list[list[float]]]]


class QueueFull(Exception):
    """The bounded queue is full; the caller should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("queue full")
        self.retry_after = retry_after


@dataclass
class Job:
    domain: str | None
    encoded: list[Any]
    tokens: int
    future: asyncio.Future[list[list[float]]]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Stats:
    requests: int = 0
    batches: int = 0
    forwards_jobs: int = 0  # jobs summed over batches (mean batch = forwards_jobs / batches)
    rejected_full: int = 0
    last_batch_seconds: float = 0.0


class Batcher:
    """Collects jobs into token-bounded batches and scores them in one model thread."""

    def __init__(self, score: ScoreFn, max_pending: int = 256, window_s: float = 0.005,
                 max_tokens: int = 8192) -> None:
        if max_pending < 1 or max_tokens < 1 or window_s < 0:
            raise ValueError("max_pending and max_tokens must be >= 1, window_s >= 0")
        self.score_fn = score
        self.max_pending = max_pending
        self.window_s = window_s
        self.max_tokens = max_tokens
        self.pending = 0
        self.stats = Stats()
        self._queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self._carry: Job | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rmkit-model")

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rmkit-batcher")

    async def stop(self) -> None:
        """Answer everything admitted, then stop the loop and the model thread."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        self._pool.shutdown(wait=True)

    def run_in_model_thread(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]":
        """Anything else that touches the model (a warm-up) runs in the same one thread."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn)

    # ---- submitting -------------------------------------------------------------------------
    async def submit(self, domain: str | None, encoded: list[Any], tokens: int) -> list[list[float]]:
        """Rewards for `encoded` (per record, per response); raises QueueFull when at the bound."""
        if self.pending >= self.max_pending:
            self.stats.rejected_full += 1
            raise QueueFull(self.retry_after())
        self.pending += 1
        self.stats.requests += 1
        job = Job(domain, encoded, tokens, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        try:
            return await asyncio.shield(job.future)  # a client gone mid-request does not cancel the batch
        finally:
            self.pending -= 1

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained a batch (at least 1: Retry-After is whole seconds)."""
        return max(1, int(self.stats.last_batch_seconds + self.window_s + 0.999))

    # ---- the loop ---------------------------------------------------------------------------
    async def _next(self, timeout: float | None) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if not self._queue.empty():  # take what is already waiting without a timer
            return self._queue.get_nowait()
        if timeout is None:
            return await self._queue.get()
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping or self._carry is not None or not self._queue.empty():
            first = await self._next(None)
            if first is None:
                stopping = True
                continue
            batch, tokens = [first], first.tokens
            deadline = loop.time() + self.window_s
            while tokens < self.max_tokens:
                try:
                    job = await self._next(max(0.0, deadline - loop.time()))
                except (asyncio.TimeoutError, TimeoutError):
                    break
                if job is None:
                    stopping = True
                    break
                if tokens + job.tokens > self.max_tokens:
                    self._carry = job
                    break
                batch.append(job)
                tokens += job.tokens
            await self._score(batch)

    async def _score(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.score_fn, [(j.domain, j.encoded) for j in batch])
        except Exception as e:  # a failed forward fails its jobs, never the server
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        finally:
            self.stats.last_batch_seconds = time.perf_counter() - t0
            self.stats.batches += 1
            self.stats.forwards_jobs += len(batch)
        for j, r in zip(batch, results):
            if not j.future.done():
                j.future.set_result(r)


def group_by_domain(registry: Any, jobs: list[tuple[str | None, list[Any]]],
                    batch_size: int | None = None) -> list[list[list[float]]]:
    """The ScoreFn over a registry: one `score` call per domain in the batch, answers in job order."""
    by_domain: dict[str | None, list[tuple[int, int]]] = {}
    for j, (domain, encoded) in enumerate(jobs):
        by_domain.setdefault(domain, []).extend((j, k) for k in range(len(encoded)))
    out: list[list[list[float]]] = [[[] for _ in encoded] for _, encoded in jobs]
    for domain, slots in by_domain.items():
        rewards = registry.score(domain, [jobs[j][1][k] for j, k in slots], batch_size)
        for (j, k), r in zip(slots, rewards):
            out[j][k] = r
    return out
