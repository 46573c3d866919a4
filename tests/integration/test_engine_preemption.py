"""What vLLM 0.32 does with the priority admission gives it, on a KV-tight engine.

The engine runs with this project's engine arguments (``--scheduling-policy priority``) and
a KV cache of about 1000 tokens, so three long requests outgrow it. In vLLM 0.32 a running
request that cannot get a new KV block preempts ``max(running, key=(priority, arrival))``:
the least urgent class first, and within a class the latest arrival
(``vllm/v1/core/sched/scheduler.py``). Under ``fcfs`` the victim would be the request
scheduled last, here the STAT one: so this test tells the two policies apart.

Each request's preemptions come from vLLM's own ``vllm:request_num_preemptions`` histogram,
read as each stream ends (the observation is recorded before the last chunk is sent), and
the three requests end at different moments.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serving.admission.priority import PriorityClass
from tests.live_server import pid_namespace_prefix, wait_for
from tests.metrics_text import total
from tests.redis_server import free_port

KV_CACHE_BYTES = 900_000  # about 1040 tokens of this checkpoint: one 1024-token request fits
MAX_MODEL_LEN = 1024
# (class, output tokens, start delay): batch first, STAT last and shortest. The cache runs
# out when the three hold roughly 250, 210 and 170 tokens (token counts, not times), while
# STAT still runs.
REQUESTS = [(PriorityClass.BATCH, 900, 0.0), (PriorityClass.INTERACTIVE, 600, 0.3), (PriorityClass.STAT, 400, 0.6)]


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
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def preemption_counts(text: str) -> tuple[float, float]:
    """(finished requests, their preemptions) from vLLM's per-request histogram."""
    return (total(text, "vllm:request_num_preemptions_count"), total(text, "vllm:request_num_preemptions_sum"))


async def run_requests(url: str) -> list[tuple[PriorityClass, float, float]]:
    """Streams the three requests; returns (class, finished, preemptions so far) per end, in order."""
    ends: list[tuple[PriorityClass, float, float]] = []
    async with httpx.AsyncClient(timeout=300) as client:
        base_count, base_sum = preemption_counts((await client.get(url + "/metrics")).text)

        async def one(priority: PriorityClass, tokens: int, delay: float) -> None:
            await asyncio.sleep(delay)
            body = {"model": "medgemma-4b-it", "max_tokens": tokens, "min_tokens": tokens, "stream": True,
                    "priority": priority.vllm_priority,  # what admission appends to every body
                    "messages": [{"role": "user", "content": f"{priority.value} study {time.time_ns()}: draft it"}]}  # fmt: skip
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    pass
            count, preempted = preemption_counts((await client.get(url + "/metrics")).text)
            ends.append((priority, count - base_count, preempted - base_sum))

        await asyncio.gather(*(one(*request) for request in REQUESTS))
    return ends


def test_under_kv_pressure_the_engine_never_preempts_the_stat_request(tight_engine):
    ends = asyncio.run(run_requests(tight_engine))
    (first, first_count, first_preempted), *rest = ends
    assert ends[-1][1] == 3 and ends[-1][2] >= 1, f"the cache never ran out, nothing shows the policy: {ends}"
    # STAT ended first, alone, never preempted: under fcfs STAT, scheduled last, is the
    # first victim and ends last
    # (its metrics are read after its stream ends: another request may have ended in between,
    # then the count is 2, and 0 preemptions over both still says STAT was never preempted)
    assert first is PriorityClass.STAT and first_count in (1, 2) and first_preempted == 0, ends
    (second, second_count, second_preempted), (last, _, total) = rest
    # When interactive and batch end apart, each one's own preemptions show batch went first
    # (by hand: batch 4, interactive 1); they often end together, and then only their sum is known.
    if second_count == 2:
        own = {second: second_preempted, last: total - second_preempted}
        assert own[PriorityClass.BATCH] >= 1 and own[PriorityClass.BATCH] >= own[PriorityClass.INTERACTIVE], ends
