"""Batched /v1/completions on the real server: every prompt is an engine request and is
charged as one, and ending a batch (its client leaves) ends every one of its requests."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.live_server import raw_post, wait_for
from tests.metrics_text import Sampler, metric

MODEL = "medgemma-4b-it"
PROMPTS = [f"Report {i}: chest film, no acute findings." for i in range(16)]


def idle(server) -> bool:
    return metric(server.url, "vllm:num_requests_running") == 0 and metric(server.url, "medgemma_inflight_units") == 0


def test_a_one_unit_account_cannot_run_a_16_prompt_batch(server):
    client = openai.OpenAI(base_url=server.base_url, api_key=server.keys["batch-one"], max_retries=0, timeout=120)
    assert wait_for(lambda: idle(server), 30)
    with Sampler(server.url, "vllm:num_requests_running") as sampler:
        for prompt in (PROMPTS, [[2, 100 + i, 7] for i in range(16)]):  # strings, then token lists
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(model=MODEL, prompt=prompt, max_tokens=64)  # non-streaming, as by default
            assert info.value.body["code"] == "request_exceeds_plan", info.value.body
            assert "16 prompts" in info.value.body["message"]
        one = client.completions.create(model=MODEL, prompt=PROMPTS[:1], max_tokens=4)  # a batch of one fits
        assert len(one.choices) == 1
        time.sleep(0.3)
    assert sampler.highest("vllm:num_requests_running") <= 1, sampler.readings[-5:]


def test_a_batch_holds_one_unit_per_prompt(server):
    key = server.keys["batch-two"]
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "prompt": PROMPTS[:2], "max_tokens": 3000, "min_tokens": 3000, "stream": True}
    assert wait_for(lambda: idle(server), 30)
    with Sampler(server.url, "vllm:num_requests_running") as sampler, httpx.Client(timeout=120) as http:
        with http.stream("POST", server.base_url + "/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["x-ratelimit-remaining-concurrency"] == "0"
            lines = response.iter_lines()
            next(lines)
            refused = http.post(server.base_url + "/completions", headers=headers,
                                json={"model": MODEL, "prompt": "hi", "max_tokens": 2})  # fmt: skip
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"
            assert wait_for(lambda: metric(server.url, "vllm:num_requests_running") == 2, 30)
    assert sampler.highest("vllm:num_requests_running") <= 2, sampler.readings[-5:]
    assert wait_for(lambda: idle(server), 30)  # the client left: both engine requests end


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_a_client_leaving_mid_batch_ends_every_engine_request_of_it(server, stream):
    body = {"model": MODEL, "prompt": PROMPTS, "max_tokens": 20000, "min_tokens": 20000, "stream": stream}
    assert wait_for(lambda: idle(server), 30)
    with raw_post(server, "/v1/completions", server.keys["main"], body):  # a client that can just leave
        assert wait_for(lambda: metric(server.url, "vllm:num_requests_running") == 16, 60)
        assert metric(server.url, "medgemma_inflight_units", plan="big") == 16
    left_at = time.monotonic()  # the client left mid-batch
    assert wait_for(lambda: idle(server), 20), (metric(server.url, "vllm:num_requests_running"),
                                                metric(server.url, "medgemma_inflight_units"))  # fmt: skip
    assert time.monotonic() - left_at < 20
