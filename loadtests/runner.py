"""Runs stages against an endpoint and collects one ``RequestRecord`` per request.

Guarantees: request preparation (image encoding) runs ahead on a worker thread, so it
neither blocks the timing loop nor delays an open loop's arrivals unless the generator truly
cannot keep up (then the lag is recorded and reported); warm-up and cool-down requests are
kept in the records but marked ``in_window=False``; a stage ends when its duration or request
count is reached and its in-flight requests have finished. A ``streams`` stage runs each of
its streams' shapes at once, each with its own workload (key, class, sizes) and arrivals.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from loadtests.client import RequestRecord, send
from loadtests.profiles import Stage
from loadtests.workload import PreparedRequest, Workload

PREFETCH = 32
CHAT_PATH = "/v1/chat/completions"


@dataclass
class StageResult:
    index: int
    stage: Stage
    started_s: float  # from the run's start
    ended_s: float  # the last response's end
    send_ended_s: float  # when the last request was sent
    records: list[RequestRecord]

    @property
    def window(self) -> tuple[float, float]:
        """The measured window: after warm-up, before cool-down (run-relative seconds)."""
        end = self.send_ended_s if self.stage.duration_s is None else self.started_s + self.stage.duration_s
        return self.started_s + self.stage.warmup_s, max(
            self.started_s + self.stage.warmup_s + 1e-6, end - self.stage.cooldown_s
        )


class Prefetcher:
    """Prepared requests, made ahead on one worker thread (the workload is not thread-safe)."""

    def __init__(self, workload: Workload, depth: int = PREFETCH):
        self.workload = workload
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="loadtest-prep")
        self.queue: asyncio.Queue[PreparedRequest] = asyncio.Queue(depth)
        self.task: asyncio.Task | None = None

    async def _fill(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.queue.put(await loop.run_in_executor(self.executor, self.workload.next))

    async def get(self) -> PreparedRequest:
        if self.task is None:
            self.task = asyncio.ensure_future(self._fill())
        return await self.queue.get()

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


class Progress:
    """A one-line progress display on stderr (only on a terminal unless forced)."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def show(self, label: str, elapsed_s: float, total: str, done: int, inflight: int, errors: int) -> None:
        if self.enabled:
            sys.stderr.write(
                f"\r{label}: {elapsed_s:6.1f}s{total}  done {done}  in flight {inflight}  "
                f"not ok {errors}   "
            )
            sys.stderr.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class Runner:
    def __init__(
        self,
        url: str,
        workload: Workload,
        *,
        seed: int = 0,
        timeout_s: float = 600.0,
        progress: Progress | None = None,
        honor_retry_after: bool = True,
        stream_workloads: list[Workload] | None = None,
    ):
        self.url = url.rstrip("/") + CHAT_PATH
        self.workload = workload
        self.stream_workloads = stream_workloads or []  # a Stream's ``workload`` indexes this
        self.seed = seed
        self.timeout_s = timeout_s
        self.progress = progress or Progress(False)
        self.honor_retry_after = honor_retry_after
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def run(self, stages: list[Stage]) -> list[StageResult]:
        prefetchers = [Prefetcher(w) for w in [self.workload, *self.stream_workloads]]
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        timeout = httpx.Timeout(self.timeout_s, connect=30.0)
        try:
            async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
                results = []
                for index, stage in enumerate(stages):
                    results.append(await self._stage(index, stage, client, prefetchers))
                return results
        finally:
            for prefetcher in prefetchers:
                prefetcher.close()

    async def _stage(self, index: int, stage: Stage, client, prefetchers: list[Prefetcher]) -> StageResult:
        records: list[RequestRecord] = []
        inflight: set[asyncio.Task] = set()
        started = self.now()
        deadline = started + stage.duration_s if stage.duration_s is not None else None
        ticker = asyncio.ensure_future(self._tick(stage, started, records, inflight))
        try:
            if stage.kind == "streams":
                await asyncio.gather(*(
                    self._drive(index, stream.shape, client, prefetchers[1 + stream.workload], records, inflight,
                                started, deadline, stream.name, self.seed + 7919 * (n + 1))
                    for n, stream in enumerate(stage.streams)
                ))  # fmt: skip
            else:
                await self._drive(index, stage, client, prefetchers[0], records, inflight, started, deadline,
                                  None, self.seed + index)  # fmt: skip
        finally:
            ticker.cancel()
            self.progress.end()
        send_ended = max((r.start_s for r in records), default=started)
        result = StageResult(index, stage, started, self.now(), send_ended, records)
        low, high = result.window
        for record in records:
            record.in_window = low <= record.start_s <= high
        return result

    async def _drive(self, index: int, shape: Stage, client, prefetcher: Prefetcher, records: list[RequestRecord],
                     inflight: set[asyncio.Task], started: float, deadline: float | None, stream: str | None,
                     arrival_seed: int) -> None:  # fmt: skip
        """One load shape (a closed or open loop) until the deadline or its request count;
        its records go to ``records`` (shared by a stage's streams)."""
        sent = 0

        def make_record(request: PreparedRequest, scheduled: float | None) -> RequestRecord:
            nonlocal sent
            sent += 1
            record = RequestRecord(
                request.index, index, request.key_label, request.images, request.image_bytes,
                len(request.body), request.max_tokens, scheduled, priority=request.priority, stream=stream,
            )  # fmt: skip
            records.append(record)
            return record

        def more() -> bool:
            if deadline is not None and self.now() >= deadline:
                return False
            return shape.requests is None or sent < shape.requests

        if shape.kind == "concurrency":
            async def client_loop():
                while more():
                    request = await prefetcher.get()
                    if not more():
                        return
                    record = await send(client, self.url, request, make_record(request, None), self.t0)
                    if record.retry_after_s and self.honor_retry_after:
                        # A refused client waits as told, like a real one (and does not
                        # turn the run into a flood of instant 429s).
                        left = (deadline - self.now()) if deadline is not None else record.retry_after_s
                        await asyncio.sleep(max(0.0, min(record.retry_after_s, left)))

            await asyncio.gather(*(client_loop() for _ in range(shape.concurrency)))
            return
        limit = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
        mine: set[asyncio.Task] = set()
        for at in shape.arrivals(arrival_seed):
            request = await prefetcher.get()
            delay = started + at - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is not None:
                await limit.acquire()
            record = make_record(request, started + at)
            task = asyncio.ensure_future(send(client, self.url, request, record, self.t0))
            for tasks in (inflight, mine):
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if limit is not None:
                task.add_done_callback(lambda _: limit.release())
        if mine:
            await asyncio.gather(*mine)

    async def _tick(self, stage: Stage, started: float, records, inflight) -> None:
        total = f"/{stage.duration_s:g}s" if stage.duration_s else f"  of {stage.requests} requests"
        while True:
            done = [r for r in records if r.outcome != "pending"]
            errors = sum(1 for r in done if r.outcome != "ok")
            pending = len(records) - len(done)
            self.progress.show(stage.label, self.now() - started, total, len(done), pending, errors)
            await asyncio.sleep(0.5)
