"""The admission layer's own CPU per request, in one process, per step and in total.

vLLM's app is replaced by a fake ASGI app that streams ``--chunks`` SSE events, so the
only work measured is ours: the same request goes through ``AdmissionMiddleware`` (keys
file mode, in-process ledger, fair queue, guard, estimator with a whitespace token
counter) and, as the baseline, straight to the fake app. Per step (auth, guard, estimate,
decision, release) each step is timed alone in a loop with the thread's CPU clock
(``time.thread_time``), so other processes on the machine do not count. The total is the
middleware run minus the bare fake app, measured in alternating blocks (A B A B ...) to
spread drift over both. Backs the "well under a millisecond" figures in docs/admission.md.

    .venv/bin/python benchmarks/admission_cpu.py --requests 2000 --chunks 16 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.admission.clock import MonotonicClock  # noqa: E402
from serving.admission.controller import AdmissionController  # noqa: E402
from serving.admission.estimate import PromptEstimator  # noqa: E402
from serving.admission.guard import RequestGuard  # noqa: E402
from serving.admission.keys import KeyStore, hash_key  # noqa: E402
from serving.admission.ledger import InProcessLedger  # noqa: E402
from serving.admission.middleware import AdmissionMiddleware  # noqa: E402
from serving.admission.outcomes import Outcome  # noqa: E402
from serving.admission.queue import Capacity, FairQueue  # noqa: E402
from serving.metrics import ServingMetrics  # noqa: E402

KEY = "mgk_benchmark_key_0000000000000000"
BODY = json.dumps({
    "model": "medgemma-4b-it", "max_tokens": 32, "stream": True,
    "messages": [{"role": "user", "content": "Describe the findings of a normal chest radiograph."}],
}).encode()  # fmt: skip
SCOPE = {
    "type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
    "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json"),
                (b"content-length", str(len(BODY)).encode())],
}  # fmt: skip


def fake_vllm(chunks: int):
    """An ASGI app shaped like vLLM's streaming chat answer: reads the body, streams SSE."""
    events = [b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'] * chunks + [b"data: [DONE]\n\n"]

    async def app(scope, receive, send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        for event in events[:-1]:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": events[-1], "more_body": False})

    return app


def build(chunks: int):
    keys = KeyStore.from_dict({
        "plans": {"bench": {"concurrency": 1_000_000}},  # every decision of a round is held at once
        "accounts": {"hospital": {"plan": "bench"}},
        "keys": [{"sha256": hash_key(KEY), "account": "hospital"}],
    })  # fmt: skip
    clock = MonotonicClock()
    metrics = ServingMetrics()
    controller = AdmissionController(
        keys, InProcessLedger(), FairQueue(Capacity(1_000_000, 1 << 40), 256, clock), metrics,
        max_model_len=8192, model_costs={"medgemma-4b-it": 1}, queue_timeout_s=30, clock=clock,
    )  # fmt: skip
    estimator = PromptEstimator(lambda text: len(text.split()), 256, 8192)
    app = fake_vllm(chunks)
    return controller, estimator, RequestGuard(), app, AdmissionMiddleware(app, controller, estimator, RequestGuard())


def scope() -> dict:
    return {**SCOPE, "headers": list(SCOPE["headers"])}


async def receive_body():
    return {"type": "http.request", "body": BODY, "more_body": False}


async def sink(message) -> None:
    pass


async def cpu_per_call(step, n: int) -> float:
    """Thread CPU microseconds per call of ``step`` (an async callable), over ``n`` calls."""
    began = time.thread_time()
    for _ in range(n):
        await step()
    return (time.thread_time() - began) / n * 1e6


async def main(args) -> None:
    controller, estimator, guard, app, middleware = build(args.chunks)
    account = controller.authenticate(KEY)
    parsed = guard.parse(BODY)
    shape = await estimator.shape("/v1/chat/completions", parsed)

    async def auth():
        controller.authenticate(KEY)

    async def guard_step():
        body = await guard.read_body(scope(), receive_body)
        await guard.check_images(guard.parse(body))

    async def estimate():
        await estimator.shape("/v1/chat/completions", parsed)

    admitted = []

    async def decide():
        admitted.append(controller.decide(account, shape))

    async def release():
        await admitted.pop().end(Outcome.COMPLETED)

    async def through_admission():
        await middleware(scope(), receive_body, sink)

    async def bare():
        await app(scope(), receive_body, sink)

    n = args.requests
    await cpu_per_call(through_admission, 200)  # warm up caches and the allocator
    await cpu_per_call(bare, 200)
    results: dict[str, list[float]] = {k: [] for k in ("auth", "guard", "estimate", "decision", "release", "total")}
    for _ in range(args.rounds):
        results["auth"].append(await cpu_per_call(auth, n))
        results["guard"].append(await cpu_per_call(guard_step, n))
        results["estimate"].append(await cpu_per_call(estimate, n))
        results["decision"].append(await cpu_per_call(decide, n))
        results["release"].append(await cpu_per_call(release, n))
        with_admission, without = [], []
        for _ in range(4):  # alternating blocks: A B A B
            with_admission.append(await cpu_per_call(through_admission, n // 4))
            without.append(await cpu_per_call(bare, n // 4))
        results["total"].append(statistics.mean(with_admission) - statistics.mean(without))
        assert controller.queue.inflight_requests == 0, "a benchmark request did not release its slot"
    print(f"admission CPU per request, microseconds (thread CPU time; {n} requests x {args.rounds} rounds, "
          f"fake app streaming {args.chunks} chunks)")  # fmt: skip
    print(f"{'step':<10} {'median':>8} {'min':>8} {'max':>8}")
    for step, values in results.items():
        print(f"{step:<10} {statistics.median(values):8.1f} {min(values):8.1f} {max(values):8.1f}")
    print("total = through the middleware minus the bare fake app; it includes the send path per chunk")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="calls per step per round")
    parser.add_argument("--chunks", type=int, default=16, help="SSE events the fake app streams")
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
