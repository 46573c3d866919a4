"""What vLLM 0.32 does with the priority admission gives it, on a KV-tight engine.

The engine runs with this project's engine arguments (``--scheduling-policy priority``) and
a KV cache of about 1000 tokens. Batch and interactive start first and fill it; STAT, sent
last, has to wait for room. In vLLM 0.32 only a running request that cannot get a new KV
block preempts, and it preempts ``max(running, key=(priority, arrival))``: the least urgent
class first, and within a class the latest arrival; the waiting queue is ordered by priority
too (``vllm/v1/core/sched/scheduler.py``). So batch is preempted, STAT takes its place and
is never a victim: it ends first. Under ``fcfs`` the victim is the request scheduled last
and STAT waits behind it, so it cannot end first: this test tells the two policies apart.

Each request's preemptions come from vLLM's own ``vllm:request_num_preemptions`` histogram,
sampled on the server while the requests run; which request a finish belongs to comes from
the tokens it generated (``vllm:request_generation_tokens``), so a client that lags the
engine cannot reorder the ends. That the cache held STAT back comes from the scheduler's
own ``vllm:num_requests_waiting``, reported every step. (vLLM's preemption counter cannot
say it: it counts a preemption when the preempted request next produces output.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serving.admission.priority import PriorityClass
from serving.cpuaffinity import colocate_engine_core
from tests.live_server import pid_namespace_prefix, wait_for
from tests.metrics_text import Sampler
from tests.redis_server import free_port

KV_CACHE_BYTES = 900_000  # about 1040 tokens of this checkpoint: one 1024-token request fits
MAX_MODEL_LEN = 1024
PROMPT_WORDS = 140  # about 300 prompt tokens each: two prompts and their first tokens fill the cache
# (class, output tokens, start delay): batch first, STAT last and shortest, so STAT needs
# hundreds of decode steps fewer than the others and, once admitted, ends seconds before
# them. No two subsets of the output counts have the same sum (see ``finishes``).
REQUESTS = [(PriorityClass.BATCH, 700, 0.0), (PriorityClass.INTERACTIVE, 600, 0.3), (PriorityClass.STAT, 200, 0.6)]


@pytest.fixture(scope="module")
def tight_engine(server, tmp_path_factory):
    """vLLM's own server with the product's engine arguments and a tiny KV cache."""
    root = tmp_path_factory.mktemp("tight")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_")}
    env |= {"MEDGEMMA_DEV_MODEL_DIR": str(server.dev_model_dir), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    args = json.loads(subprocess.check_output(
        [sys.executable, "-m", "serving", "engine-args", "--json", "--port", str(port),
         "--max-model-len", str(MAX_MODEL_LEN), "--max-images-per-prompt", "1"], env=env))  # fmt: skip
    assert args[args.index("--scheduling-policy") + 1] == "priority"
    log = root / "vllm.log"
    argv = [*pid_namespace_prefix(), sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args,
            "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, log.read_text()[-4000:]
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        assert wait_for(healthy, 300, poll_s=0.5), log.read_text()[-4000:]
        # as the product's launcher does: else the EngineCore's poll loop starves this API
        # server (and /metrics) on a 2-core host (serving/cpuaffinity.py)
        assert colocate_engine_core(process.pid), "the EngineCore was not moved onto its worker's cores"
        # the first chat request sets up the API server's renderer and stalls its event loop
        # (and /metrics) for seconds: done here, not while the test samples
        warm = {"model": "medgemma-4b-it", "max_tokens": 1, "messages": [{"role": "user", "content": "warm up"}]}
        assert httpx.post(url + "/v1/chat/completions", json=warm, timeout=120).status_code == 200
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


FINISHED = "vllm:request_num_preemptions_count"
PREEMPTIONS = "vllm:request_num_preemptions_sum"
GENERATED = "vllm:request_generation_tokens_sum"
WAITING = "vllm:num_requests_waiting"  # the scheduler's queue, reported every step
# A request that arrives between two engine steps waits milliseconds; one the cache holds
# back waits until something is preempted or ends (about 0.7 s here, by hand).
HELD_BACK_S = 0.2


def finishes(readings: list[dict[str, float]]) -> list[tuple[set[PriorityClass], float, float]]:
    """The engine's finishes, in its order: (the classes that finished between two readings,
    their preemptions, the longest time so far that the engine's queue held a request
    without a break, over consecutive readings). Each request generates exactly its
    own token count, and no two subsets of the three counts have the same sum, so the
    generated-token delta names them. vLLM observes a finished request's histograms one
    after the other, so a scrape can fall between them (its finish counted, its tokens
    not yet): such a reading is skipped, and the finish is read against the next one."""
    by_tokens = {tokens: priority for priority, tokens, _ in REQUESTS}
    steps, longest, since = [], 0.0, None
    anchor, pending = readings[0], None  # the reading the next finish is measured from
    for before, after in zip(readings, readings[1:]):
        if before[WAITING] >= 1 and after[WAITING] >= 1:
            since = before["_t"] if since is None else since
            longest = max(longest, after["_t"] - since)
        else:
            since = None
        if after[FINISHED] == anchor[FINISHED] and after[GENERATED] == anchor[GENERATED]:
            anchor = after
            continue
        generated = after[GENERATED] - anchor[GENERATED]
        classes = next((
            {by_tokens[t] for t in subset}
            for subset in itertools.combinations(by_tokens, int(after[FINISHED] - anchor[FINISHED]))
            if sum(subset) == generated
        ), None) if after[FINISHED] > anchor[FINISHED] else None  # fmt: skip
        if classes is None:  # mid-update: read this finish against the next reading
            pending = (anchor, after)
            continue
        steps.append((classes, after[PREEMPTIONS] - anchor[PREEMPTIONS], round(longest, 2)))
        anchor, pending = after, None
    assert pending is None, f"generated tokens that match no set of requests: {pending}"
    return steps


async def run_requests(url: str) -> None:
    """Streams the three requests, each to its end."""
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(priority: PriorityClass, tokens: int, delay: float) -> None:
            await asyncio.sleep(delay)
            body = {"model": "medgemma-4b-it", "max_tokens": tokens, "min_tokens": tokens, "stream": True,
                    "priority": priority.vllm_priority,  # what admission appends to every body
                    "messages": [{"role": "user", "content": f"{priority.value} study {time.time_ns()}: " + "finding " * PROMPT_WORDS}]}  # fmt: skip
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    pass

        await asyncio.gather(*(one(*request) for request in REQUESTS))


def test_under_kv_pressure_the_engine_never_preempts_the_stat_request(tight_engine):
    # The server's own counters, sampled every 20 ms while the requests run: when the test
    # process is starved of CPU its streams lag the engine, the engine's counters do not.
    with Sampler(tight_engine, FINISHED, PREEMPTIONS, GENERATED, WAITING, interval_s=0.02) as sampler:
        assert wait_for(lambda: sampler.readings, 10), sampler.errors[-3:]
        asyncio.run(run_requests(tight_engine))
        assert wait_for(lambda: sampler.latest(FINISHED) - sampler.readings[0][FINISHED] == 3, 10)
    times = [r["_t"] for r in sampler.readings]
    where = f"{sampler.errors[-3:]}, longest gap between readings {max(b - a for a, b in zip(times, times[1:])):.2f} s"
    steps = finishes(sampler.readings)
    assert steps, f"no finish was read: {where}"
    (first, first_preempted, waited_by_then), *rest = steps
    # The cache could not take all three: a request waited for room before the first one
    # ended. Only then does the policy decide who runs, and the test can tell policies apart.
    assert waited_by_then >= HELD_BACK_S, f"no request was held back, nothing shows the policy: {steps}, {where}"
    # STAT ended first, alone, never preempted: under fcfs STAT waits behind whatever was
    # preempted and cannot end first (by hand: batch ends first, STAT last, preempted 4 times).
    # Hundreds of decode steps separate the ends; the sampler reads every 20 ms.
    assert first == {PriorityClass.STAT} and first_preempted == 0, (steps, where)
    # When interactive and batch end apart, each one's own preemptions show batch went first
    # (by hand: batch 4, interactive 1); when they end together only their sum is known.
    if len(rest) == 2:
        own = {classes.pop(): preempted for classes, preempted, _ in rest}
        assert own[PriorityClass.BATCH] >= 1 and own[PriorityClass.BATCH] >= own[PriorityClass.INTERACTIVE], steps
