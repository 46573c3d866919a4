"""What a usage record costs the event loop per request, in one process (issue 14's goal:
under 0.05 ms).

The same request goes through the real ``AdmissionMiddleware`` (keys-file mode, in-process
ledger, fair queue, guard, estimator) over a fake vLLM app that streams ``--chunks`` SSE
events, in two arms that differ only in the usage recorder: off (no log, no per-account
metrics: the open-mode default) and on (a real ``UsageLog`` writing to a file, per-account
metrics on). The arms alternate in blocks (A B A B ...), and each block is timed with the
event-loop thread's CPU clock (``time.thread_time``): the writer thread's JSON encoding and
file writes are not the event loop's and do not count; other processes do not either.
It also times the engine-side hooks alone (``serving.usage.engine_tokens``: the generate
wrapper and the output processor's finish hook, which run on the same event loop).

    .venv/bin/python benchmarks/usage_overhead.py --requests 4000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.admission_cpu import build, receive_body, scope, sink  # noqa: E402
from serving.usage.engine_tokens import TokenTally, count_engine_tokens, token_tally  # noqa: E402
from serving.usage.recorder import UsageRecorder  # noqa: E402
from serving.usage.writer import UsageLog  # noqa: E402


async def cpu_us(run, n: int) -> float:
    began = time.thread_time()
    for _ in range(n):
        await run()
    return (time.thread_time() - began) / n * 1e6


async def hooks_us(n: int) -> float:
    """The engine hooks per request: generate registers the tally, the finish hook counts."""
    states = {}
    processor = SimpleNamespace(request_states=states, external_req_ids={}, abort_requests=lambda ids, internal=False: [],
                                _finish_request=lambda state: states.pop(state.request_id))  # fmt: skip

    async def generate(prompt, params, request_id, **kwargs):
        yield None

    client = SimpleNamespace(output_processor=processor, generate=generate)
    count_engine_tokens(client)
    detokenizer = SimpleNamespace(num_output_tokens=lambda: 32)

    async def one(i=[0]):  # noqa: B006 - a counter
        i[0] += 1
        rid = f"chatcmpl-{i[0]}"
        tally = TokenTally()
        token_tally.set(tally)
        async for _ in client.generate(None, None, rid):
            pass
        state = SimpleNamespace(request_id=rid, external_req_id=rid, prompt_len=20, request_index=0, detokenizer=detokenizer)
        states[rid] = state
        processor._finish_request(state)

    async def bare(i=[0]):  # noqa: B006
        async for _ in generate(None, None, "x"):
            pass
        states["x"] = SimpleNamespace(request_id="x")
        states.pop("x")

    await cpu_us(one, 200)
    return await cpu_us(one, n) - await cpu_us(bare, n)


async def bookkeeping_us(n: int) -> float:
    """What both arms pay: the per-request ``RequestUsage`` the middleware fills in."""
    from serving.usage.record import RequestUsage

    body, served = {"model": "medgemma-4b-it", "stream": True}, frozenset({"medgemma-4b-it"})

    async def one():
        usage = RequestUsage("0123456789abcdef", "/v1/chat/completions", time.monotonic())
        usage.body_read(body, served)
        usage.authenticated_at = usage.deciding_at = time.monotonic()

    async def bare():
        time.monotonic()

    return await cpu_us(one, n) - await cpu_us(bare, n)


async def main(args) -> None:
    folder = Path(tempfile.mkdtemp(prefix="usage-overhead-"))
    _, _, _, _, off = build(args.chunks)
    controller, _, _, _, on = build(args.chunks)
    off.usage = UsageRecorder(off.controller.metrics)
    log = UsageLog(folder / "usage.jsonl", controller.metrics)
    on.usage = UsageRecorder(controller.metrics, log, served_models=frozenset({"medgemma-4b-it"}), account_metrics_max=50)

    async def through(middleware):
        await middleware(scope(), receive_body, sink)

    for middleware in (off, on):
        await cpu_us(lambda m=middleware: through(m), 300)  # warm up
    n = args.requests
    deltas, offs, ons, hooks, books = [], [], [], [], []
    for _ in range(args.rounds):
        a, b = [], []
        for _ in range(4):
            a.append(await cpu_us(lambda: through(off), n // 4))
            b.append(await cpu_us(lambda: through(on), n // 4))
        offs.append(statistics.mean(a))
        ons.append(statistics.mean(b))
        deltas.append(ons[-1] - offs[-1])
        hooks.append(await hooks_us(n))
        books.append(await bookkeeping_us(n))
    log.close()
    written = sum(1 for _ in (folder / "usage.jsonl").open())
    print(f"event-loop CPU per request, microseconds (thread CPU; {n} requests x {args.rounds} rounds, "
          f"fake app streaming {args.chunks} chunks; {written} records written)")  # fmt: skip
    print(f"{'arm':<34} {'median':>8} {'min':>8} {'max':>8}")
    for name, values in (("usage off (open-mode default)", offs), ("usage on (records + account metrics)", ons),
                         ("record + metrics (on - off)", deltas), ("engine token hooks", hooks),
                         ("bookkeeping in both arms", books)):  # fmt: skip
        print(f"{name:<34} {statistics.median(values):8.1f} {min(values):8.1f} {max(values):8.1f}")
    total = statistics.median(deltas) + statistics.median(hooks) + statistics.median(books)
    print(f"usage per request: {total / 1000:.4f} ms (goal < 0.05 ms); on/off ratio {statistics.median(ons) / statistics.median(offs):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per arm per round")
    parser.add_argument("--chunks", type=int, default=16, help="SSE events the fake app streams")
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
