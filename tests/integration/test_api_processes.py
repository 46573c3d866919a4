"""Two API processes in front of one engine (``--api-processes 2``), on the real server.

What must hold: both processes serve; an account's budget is exact across them (the host
ledger); ``/metrics`` in either process shows both processes' values added up; SIGHUP
reaches both and ends neither (also without a keys file); SIGTERM drains both and the
server exits 0 without leaving its ledger behind. The admission property test runs
against this server too (tests/integration/test_properties_live.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal

import httpx

from tests.live_server import API_PROCESSES, launch, stop, usage_by_process, wait_every_api_process, wait_for
from tests.metrics_text import metric, samples, scrape

MODEL = "medgemma-4b-it"


def chat(max_tokens: int, stream: bool = False) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Describe a chest film."}],
            "max_tokens": max_tokens, "min_tokens": max_tokens, "stream": stream}  # fmt: skip


async def spread_clients(url: str, key: str | None, count: int) -> list[httpx.AsyncClient]:
    """``count`` clients, each with its connection open: vLLM hands each new connection to
    the API process with the fewest open ones, so the processes get about half each."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    clients = [httpx.AsyncClient(timeout=120, headers=headers) for _ in range(count)]
    await asyncio.gather(*(c.get(url + "/health") for c in clients))
    return clients


async def post_at_once(url: str, key: str | None, count: int, max_tokens: int) -> list[httpx.Response]:
    """``count`` non-streaming requests (the openai client's default), one per connection."""
    clients = await spread_clients(url, key, count)
    try:
        return await asyncio.gather(*(c.post(url + "/v1/chat/completions", json=chat(max_tokens)) for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


async def statuses_while_all_open(url: str, key: str, count: int) -> list[int]:
    """``count`` long streams sent at once; each one's status, read while every admitted one
    is still streaming (so none ends before the last is decided)."""
    clients = await spread_clients(url, key, count)
    async with contextlib.AsyncExitStack() as stack:
        for c in clients:
            stack.push_async_callback(c.aclose)
        responses = await asyncio.gather(*(
            stack.enter_async_context(c.stream("POST", url + "/v1/chat/completions", json=chat(2000, stream=True)))
            for c in clients
        ))  # fmt: skip
        return [r.status_code for r in responses]


def test_an_accounts_budget_is_exact_across_the_api_processes(multi_server):
    srv = multi_server
    before = {p: len(r) for p, r in usage_by_process(srv).items()}

    def pair_records() -> dict[int, list[dict]]:
        return {p: [r for r in recs[before[p]:] if r.get("account") == "pair"] for p, recs in usage_by_process(srv).items()}

    # "pair" has 2 units: 12 streams at once over both processes, all held open
    codes = sorted(asyncio.run(statuses_while_all_open(srv.url, srv.keys["pair"], 12)))
    assert codes == [200] * 2 + [429] * 10, codes
    assert wait_for(lambda: sum(len(r) for r in pair_records().values()) == 12, 20), pair_records()
    # both processes decided some: one budget, two deciders (per-process ledgers admit 4)
    new = pair_records()
    assert all(new.values()), {p: len(r) for p, r in new.items()}
    outcomes = sorted(r["outcome"] for recs in new.values() for r in recs)
    assert outcomes.count("rejected_concurrency_limit") == 10, outcomes
    assert wait_for(lambda: metric(srv.url, "medgemma_inflight_units", plan="two") == 0, 10)


def test_metrics_add_up_over_the_processes(multi_server, server):
    srv = multi_server
    before = {p: len(r) for p, r in usage_by_process(srv).items()}
    admitted_before = metric(srv.url, "medgemma_admission_total", outcome="admitted")
    responses = asyncio.run(post_at_once(srv.url, srv.keys["main"], 8, max_tokens=4))
    assert [r.status_code for r in responses] == [200] * 8
    # both processes served some of the 8, so the sum below is a sum over processes
    assert wait_for(lambda: all(len(r) > before[p] for p, r in usage_by_process(srv).items()), 10)
    found = samples(scrape(srv.url))
    assert metric(srv.url, "medgemma_admission_total", outcome="admitted") - admitted_before == 8
    # each process holds its share of the engine; together the engine's max_num_seqs
    assert metric(srv.url, "medgemma_capacity_units") == metric(server.url, "medgemma_capacity_units") == 16
    assert metric(srv.url, "medgemma_engine_ready") == 1
    build = [labels for name, labels, _ in found if name == "medgemma_build_info"]
    assert len(build) == 1 and build[0]["profile"] == "cpu-dev", build
    assert any(name.startswith("vllm:") for name, _, _ in found)  # vLLM's engine metrics beside ours
    assert wait_for(lambda: metric(srv.url, "medgemma_inflight_units", plan="big") == 0, 10)


def test_sighup_reaches_every_api_process(multi_server):
    """Kubernetes and operators signal the server's pid 1, the parent: each API process holds
    its own keys, so each must reload (the file is unchanged: only SIGHUP reloads it)."""
    srv = multi_server

    def reloaded_by() -> list[str]:
        return re.findall(r" (api\d+) rid=-: keys file reloaded \(SIGHUP\)", srv.log())

    before = len(reloaded_by())
    srv.send_signal(signal.SIGHUP)
    assert wait_for(lambda: len(reloaded_by()) - before == API_PROCESSES, 20), srv.log()[-3000:]
    assert sorted(reloaded_by()[before:]) == [f"api{i}" for i in range(API_PROCESSES)]
    srv.assert_alive()


def test_sigterm_drains_every_api_process_and_exits_0(tmp_path, server):
    # open mode (no keys file): SIGHUP has no reloader to go to and must end nothing
    srv = launch(tmp_path, None, {}, "--api-processes", "2", "--drain-timeout-s", "120", "--open-budget", "8",
                 dev_model_dir=server.dev_model_dir)  # fmt: skip
    try:
        wait_every_api_process(srv)
        ledger = re.search(r"budget ledger: shared by this host's 2 API processes \((\S+)\)", srv.log())
        assert ledger is not None, srv.log()[-3000:]
        srv.send_signal(signal.SIGHUP)
        assert wait_for(lambda: httpx.get(srv.url + "/ready", timeout=5).status_code == 200, 10)
        srv.assert_alive()

        async def during_drain() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
            running = asyncio.ensure_future(post_at_once(srv.url, None, 4, max_tokens=600))
            assert await asyncio.to_thread(wait_for, lambda: metric(srv.url, "medgemma_inflight_units") == 4, 60)
            srv.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(timeout=10) as client:
                ready = await client.get(srv.url + "/ready")
                refused = await client.post(srv.url + "/v1/chat/completions", json=chat(2))
            return await running, ready, refused

        finished, ready, refused = asyncio.run(during_drain())
        assert ready.status_code == 503 and refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        assert [r.status_code for r in finished] == [200] * 4  # admitted ones ran to their end
        assert all(r.json()["usage"]["completion_tokens"] == 600 for r in finished)
        assert srv.process.wait(timeout=180) == 0, srv.log()[-4000:]
        assert srv.log().count("drain: done") == API_PROCESSES
        assert not os.path.exists(ledger.group(1)), "the host ledger outlived the server"
    finally:
        stop(srv, signal.SIGKILL)
