"""Priority classes on the real server: a batch flood fills only its share of the engine, STAT
requests never wait for a slot and are never refused, and keys bound what a request may ask."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.live_server import wait_for
from tests.metrics_text import Sampler, metric, scrape, total

MODEL = "medgemma-4b-it"
ENGINE_SLOTS = 16  # cpu-dev's max_num_seqs
BATCH_LIMIT = ENGINE_SLOTS // 2  # batch_share 0.5 (the default)
FLOOD = BATCH_LIMIT + 6  # more batch requests at once than batch may run: some must wait


def chat(max_tokens: int, stream: bool = True, **extra) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "min_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "Draft the report for study 1234."}], **extra}  # fmt: skip


def idle(server) -> bool:
    return metric(server.url, "medgemma_inflight_units") == 0 and metric(server.url, "vllm:num_requests_running") == 0


def histogram(text: str, name: str, priority: str) -> tuple[float, float]:
    """(observations at or under 5 ms, all observations) of a by-class histogram."""
    fast = total(text, name + "_bucket", priority=priority, le="0.005")
    return fast, total(text, name + "_count", priority=priority)


def test_a_batch_flood_holds_only_its_share_and_stat_never_waits_or_is_refused(server):
    assert wait_for(lambda: idle(server), 60)
    before = scrape(server.url)
    batch_headers = {"Authorization": f"Bearer {server.keys['backlog']}"}  # batch by default
    flood_statuses: list[int] = []
    flood_failures: list[str] = []
    stop = threading.Event()

    def batch_worker():
        try:
            with httpx.Client(timeout=300) as client:
                while not stop.is_set():
                    with client.stream("POST", server.base_url + "/chat/completions", json=chat(200),
                                       headers=batch_headers) as response:  # fmt: skip
                        body = response.read()
                        flood_statuses.append(response.status_code)
                        if not body.rstrip().endswith(b"data: [DONE]") or b'"error"' in body:
                            flood_failures.append(body[-300:].decode(errors="replace"))
        except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
            flood_failures.append(repr(exc))

    stat = openai.OpenAI(base_url=server.base_url, api_key=server.keys["stat-clinic"], max_retries=0, timeout=120)
    workers = [threading.Thread(target=batch_worker, daemon=True) for _ in range(FLOOD)]
    stat_results = []
    with Sampler(server.url, "medgemma_inflight_requests", labels={"priority": "batch"}) as batch_running, \
            Sampler(server.url, "medgemma_queue_depth") as queued:  # fmt: skip
        for worker in workers:
            worker.start()
        assert wait_for(lambda: (queued.latest("medgemma_queue_depth") or 0) > 0, 60), "the flood never queued"
        for i in range(6):  # a STAT request now and then, non-streaming (the openai default)
            began = time.monotonic()
            reply = stat.chat.completions.create(model=MODEL, max_tokens=8, messages=chat(8)["messages"],
                                                 extra_headers={"x-priority": "stat"})  # fmt: skip
            stat_results.append((reply.choices[0].message.content, time.monotonic() - began))
            time.sleep(0.5)
        stop.set()
        for worker in workers:
            worker.join(300)
    assert len(stat_results) == 6 and all(text for text, _ in stat_results)  # 0 STAT refusals
    assert set(flood_statuses) == {200} and not flood_failures, (sorted(set(flood_statuses)), flood_failures[:3])
    assert batch_running.highest("medgemma_inflight_requests") <= BATCH_LIMIT, batch_running.readings[-5:]
    assert batch_running.highest("medgemma_inflight_requests") == BATCH_LIMIT  # it soaked up its share
    after = scrape(server.url)
    stat_fast, stat_all = (a - b for a, b in zip(histogram(after, "medgemma_queue_wait_seconds", "stat"),
                                                histogram(before, "medgemma_queue_wait_seconds", "stat")))  # fmt: skip
    batch_fast, batch_all = (a - b for a, b in zip(histogram(after, "medgemma_queue_wait_seconds", "batch"),
                                                  histogram(before, "medgemma_queue_wait_seconds", "batch")))  # fmt: skip
    assert stat_all == 6 and stat_fast == 6  # every STAT request found a slot at once
    assert batch_all > batch_fast  # while batch requests waited for theirs
    admitted = total(after, "medgemma_admission_total", outcome="admitted", priority="stat") - total(
        before, "medgemma_admission_total", outcome="admitted", priority="stat")
    assert admitted == 6
    assert wait_for(lambda: idle(server), 120)


@pytest.mark.parametrize("account,headers,body,status,code", [
    ("backlog", {"x-priority": "stat"}, {}, 403, "priority_not_allowed"),  # above its key: never downgraded
    ("backlog", {}, {"priority": -5}, 403, "priority_not_allowed"),  # vLLM's field, mapped to stat
    ("stat-clinic", {"x-priority": "urgent"}, {}, 400, "invalid_priority"),
    ("stat-clinic", {}, {"priority": "high"}, 400, "invalid_priority"),
])  # fmt: skip
def test_a_class_above_the_key_or_unreadable_is_refused_before_anything_is_held(server, account, headers, body,
                                                                                status, code):  # fmt: skip
    plan = {"backlog": "bulk", "stat-clinic": "clinic"}[account]
    outcome = {403: "rejected_priority_not_allowed", 400: "rejected_invalid_priority"}[status]
    before = scrape(server.url)
    response = httpx.post(server.base_url + "/chat/completions", json=chat(4, stream=False, **body),
                          headers={"Authorization": f"Bearer {server.keys[account]}", **headers}, timeout=60)  # fmt: skip
    assert response.status_code == status and response.json()["error"]["code"] == code, response.text
    assert response.headers["x-ratelimit-limit-concurrency"] == {"bulk": "64", "clinic": "8"}[plan]
    after = scrape(server.url)
    assert total(after, "medgemma_admission_total", outcome=outcome) - total(before, "medgemma_admission_total",
                                                                             outcome=outcome) == 1  # fmt: skip
    assert total(after, "medgemma_admission_total", outcome="admitted") == total(
        before, "medgemma_admission_total", outcome="admitted")  # nothing was admitted, nothing held
    assert total(after, "medgemma_inflight_units", plan=plan) == 0


@pytest.mark.parametrize("priority", ["stat", "interactive", "batch"])
def test_every_class_runs_on_the_engine_with_its_scheduling_priority(server, priority):
    """vLLM accepts the priority admission adds (it runs with --scheduling-policy priority:
    under fcfs any non-zero priority is a 400), also from a client's own body field."""
    client = openai.OpenAI(base_url=server.base_url, api_key=server.keys["stat-clinic"], max_retries=0, timeout=120)
    before = metric(server.url, "medgemma_admission_total", outcome="admitted", priority=priority)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, max_tokens=4, messages=chat(4)["messages"],
                                                           extra_headers={"x-priority": priority})  # fmt: skip
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-priority"] == priority  # the response names the class it ran in
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=4, messages=chat(4)["messages"],
        extra_body={"priority": {"stat": -1, "interactive": 0, "batch": 3}[priority]})  # fmt: skip
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-priority"] == priority
    # both ran in the class they asked for; vLLM accepted the priority admission gave them
    assert metric(server.url, "medgemma_admission_total", outcome="admitted", priority=priority) - before == 2


def test_the_real_vllm_renderer_preprocesses_images_in_class_order(server):
    """vLLM 0.32's renderer has the single preprocessing worker admission replaces: if a vLLM
    upgrade changes it, the server says so and this fails (the order would be FIFO again)."""
    log = server.log()
    assert "image preprocessing runs in priority-class order" in log
    assert "image preprocessing stays first come first served" not in log
