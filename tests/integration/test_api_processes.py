"""Two API processes in front of one engine (``--api-processes 2``), on the real server.

What must hold: both processes serve; an account's budget is exact across them (the host
ledger); ``/metrics`` in either process shows both processes' values added up; SIGHUP
reaches both; SIGTERM drains both and the server exits 0 without leaving its ledger
behind. The admission property test runs against this server too
(tests/integration/test_properties_live.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

import httpx

from tests.live_server import API_PROCESSES, launch, stop, wait_for, wait_ready, write_keys
from tests.metrics_text import metric, samples, scrape

MODEL = "medgemma-4b-it"


def records(srv) -> dict[int, list[dict]]:
    """Each API process's usage records (one usage file per process)."""
    found = {}
    for process in range(API_PROCESSES):
        path = srv.usage_log.with_name(f"{srv.usage_log.stem}-api{process}{srv.usage_log.suffix}")
        found[process] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return found


async def send_at_once(url: str, key: str, count: int, max_tokens: int) -> list[httpx.Response]:
    """``count`` non-streaming requests (the openai client's default), each on a connection
    of its own, all open before any is sent: vLLM hands connections to the process with
    the fewest open ones, so both processes get some."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Describe a chest film."}],
            "max_tokens": max_tokens, "min_tokens": max_tokens}  # fmt: skip
    clients = [httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) for _ in range(count)]
    try:
        await asyncio.gather(*(c.get(url + "/health") for c in clients))  # connections open and spread
        return await asyncio.gather(*(c.post(url + "/v1/chat/completions", json=body) for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def test_an_accounts_budget_is_exact_across_the_api_processes(multi_server):
    srv = multi_server
    before = {p: len(r) for p, r in records(srv).items()}
    # "pair" has 2 units; 12 requests long enough to overlap arrive on both processes
    responses = asyncio.run(send_at_once(srv.url, srv.keys["pair"], 12, max_tokens=400))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 2 + [429] * 10, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    # both processes decided some of them: one budget, two deciders
    assert wait_for(lambda: sum(len(r) for r in records(srv).values()) - sum(before.values()) >= 12, 10)
    new = {p: [r for r in recs[before[p]:] if r.get("account") == "pair"] for p, recs in records(srv).items()}
    assert all(new[p] for p in new), {p: len(r) for p, r in new.items()}
    outcomes = sorted(r["outcome"] for recs in new.values() for r in recs)
    assert outcomes.count("completed") == 2 and outcomes.count("rejected_concurrency_limit") == 10, outcomes
    assert wait_for(lambda: metric(srv.url, "medgemma_inflight_units", plan="two") == 0, 10)


def test_metrics_add_up_over_the_processes(multi_server, server):
    srv = multi_server
    admitted_before = metric(srv.url, "medgemma_admission_total", outcome="admitted")
    responses = asyncio.run(send_at_once(srv.url, srv.keys["main"], 8, max_tokens=4))
    assert [r.status_code for r in responses] == [200] * 8
    text = scrape(srv.url)
    found = samples(text)
    # each process holds its share of the engine; together the engine's max_num_seqs
    assert metric(srv.url, "medgemma_capacity_units") == metric(server.url, "medgemma_capacity_units") == 16
    assert metric(srv.url, "medgemma_admission_total", outcome="admitted") - admitted_before == 8
    assert metric(srv.url, "medgemma_engine_ready") == 1
    build = [labels for name, labels, _ in found if name == "medgemma_build_info"]
    assert len(build) == 1 and build[0]["profile"] == "cpu-dev", build
    assert any(name.startswith("vllm:") for name, _, _ in found)  # vLLM's engine metrics beside ours
    # the budget's own figures: every process's requests, none left held
    assert wait_for(lambda: metric(srv.url, "medgemma_inflight_units", plan="big") == 0, 10)


def test_sighup_reaches_every_api_process(multi_server):
    """Kubernetes and operators signal the server's pid 1, the parent: each API process holds
    its own keys, so each must reload (the file is unchanged: only SIGHUP reloads it)."""
    srv = multi_server
    before = srv.log().count("keys file reloaded (SIGHUP)")
    srv.send_signal(signal.SIGHUP)
    assert wait_for(lambda: srv.log().count("keys file reloaded (SIGHUP)") - before == API_PROCESSES, 20), (
        srv.log()[-3000:]
    )
    srv.assert_alive()


def test_sigterm_drains_every_api_process_and_exits_0(tmp_path, server):
    keys_file = tmp_path / "keys.yaml"
    keys = write_keys(keys_file, {"main": "big"})
    srv = launch(tmp_path, keys_file, keys, "--api-processes", "2", "--drain-timeout-s", "60",
                 dev_model_dir=server.dev_model_dir)  # fmt: skip
    try:
        wait_ready(srv)
        ledger = re.search(r"budget ledger: shared by this host's 2 API processes \((\S+)\)", srv.log())
        assert ledger is not None, srv.log()[-3000:]

        async def during_drain() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
            running = asyncio.ensure_future(send_at_once(srv.url, keys["main"], 4, max_tokens=1500))
            assert await asyncio.to_thread(
                wait_for, lambda: metric(srv.url, "medgemma_inflight_units", plan="big") == 4, 60
            )
            srv.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(timeout=10) as client:
                ready = await client.get(srv.url + "/ready")
                refused = await client.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {keys['main']}"},
                                            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
            return await running, ready, refused

        finished, ready, refused = asyncio.run(during_drain())
        assert ready.status_code == 503 and refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        assert [r.status_code for r in finished] == [200] * 4  # admitted ones ran to their end
        assert all(r.json()["usage"]["completion_tokens"] == 1500 for r in finished)
        assert srv.process.wait(timeout=120) == 0, srv.log()[-4000:]
        assert srv.log().count("drain: done") == API_PROCESSES
        assert not os.path.exists(ledger.group(1)), "the host ledger outlived the server"
    finally:
        stop(srv, signal.SIGKILL)
