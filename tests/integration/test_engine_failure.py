"""The engine dies (SIGKILL) or hangs (SIGSTOP): running streams end with an SSE error
event, new requests get 503 engine_unavailable, /ready and /health turn 503 and the
process exits 1 so the orchestrator restarts it. (Queued requests evicted with the same
error: tests/unit/test_enginewatch.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.live_server import launch, stop, wait_ready, write_keys

HANG_TIMEOUT_S = 6


def engine_core_pid(srv) -> int:
    out = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(srv.process.pid)], capture_output=True, text=True).stdout
    pids = [int(line.split()[0]) for line in out.splitlines() if "EngineCore" in line]
    assert pids, out
    return pids[0]


def stream(url: str, key: str, results, started) -> None:
    """A long stream in its own process (see test_drain): reports status and events."""
    started.put(True)  # a spawned interpreter takes seconds to get here on a busy machine
    body = {
        "model": "medgemma-4b-it", "messages": [{"role": "user", "content": "Describe a chest film."}],
        "max_tokens": 20000, "min_tokens": 20000, "stream": True,
    }  # fmt: skip
    out = {}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as r:  # fmt: skip
            out["status"] = r.status_code
            out["events"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    results.put(out)


def inflight(srv) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^medgemma_inflight_units\{[^}]*\} (\S+)$", text, re.M))


@pytest.fixture
def victim(tmp_path, server):
    keys_file = tmp_path / "keys.yaml"
    keys = write_keys(keys_file, {"main": "big"})
    shm_before = set(os.listdir("/dev/shm"))
    srv = launch(tmp_path, keys_file, keys, "--engine-hang-timeout-s", str(HANG_TIMEOUT_S),
                 dev_model_dir=server.dev_model_dir)  # fmt: skip
    try:
        wait_ready(srv)
        yield srv
    finally:
        stop(srv, signal.SIGKILL)
        # Killed processes never unlink their shared memory (vLLM's message queues).
        for name in set(os.listdir("/dev/shm")) - shm_before:
            if name.startswith("psm_"):
                (Path("/dev/shm") / name).unlink(missing_ok=True)


def test_a_non_streaming_request_longer_than_the_hang_timeout_is_no_hang(victim):
    """The openai client's default: nothing is sent until the request ends. The engine keeps
    producing, so it is not hung, however long the response takes."""
    from openai import OpenAI

    srv = victim
    client = OpenAI(base_url=srv.base_url, api_key=srv.keys["main"], max_retries=0, timeout=600)
    messages = [{"role": "user", "content": "Describe a chest film."}]
    began = time.monotonic()
    client.chat.completions.create(model="medgemma-4b-it", messages=messages, max_tokens=300,
                                   extra_body={"min_tokens": 300})  # fmt: skip
    per_token_s = (time.monotonic() - began) / 300
    tokens = min(30000, int(3.5 * HANG_TIMEOUT_S / per_token_s))  # about 3.5 hang timeouts long
    began = time.monotonic()
    reply = client.chat.completions.create(model="medgemma-4b-it", messages=messages, max_tokens=tokens,
                                           extra_body={"min_tokens": tokens})  # fmt: skip
    took = time.monotonic() - began
    assert reply.usage.completion_tokens == tokens
    assert took > 3 * HANG_TIMEOUT_S, f"{took:.1f}s: too short to show anything ({tokens} tokens)"
    srv.assert_alive()
    assert httpx.get(srv.url + "/ready", timeout=10).status_code == 200
    assert "engine hung" not in srv.log()


# One rerun with a fresh server for this VM's multi-second stalls (see test_drain); a
# second failure is a real one.
@pytest.mark.flaky(reruns=1, reruns_delay=10)
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["engine-dies", "engine-hangs"])
def test_engine_failure_ends_requests_clearly_and_exits_1(victim, spawn_client, fault):
    srv = victim
    results, started = spawn_client.context.Queue(), spawn_client.context.Queue()
    client = spawn_client(stream, srv.url, srv.keys["main"], results, started)
    started.get(timeout=120)
    deadline = time.monotonic() + 60
    while inflight(srv) < 1 and time.monotonic() < deadline and results.empty():
        time.sleep(0.1)
    assert inflight(srv) == 1, (None if results.empty() else results.get(), client.exitcode, srv.log()[-3000:])
    core = engine_core_pid(srv)
    failed_at = time.monotonic()
    os.kill(core, fault)
    try:
        out = results.get(timeout=HANG_TIMEOUT_S + 60)
        client.join(10)
        # The stream ended with an error event the client can read, then [DONE].
        assert out.get("status") == 200, out
        assert out["events"][-1] == "[DONE]"
        error = json.loads(out["events"][-2])["error"]
        assert error["code"] == "engine_unavailable", error
        ended_after = time.monotonic() - failed_at
        if fault == signal.SIGSTOP:
            assert HANG_TIMEOUT_S - 1 < ended_after < HANG_TIMEOUT_S + 60  # wide: VM stalls

        # Until it exits, the process says so and refuses new work clearly.
        try:
            ready = httpx.get(srv.url + "/ready", timeout=5)
            health = httpx.get(srv.url + "/health", timeout=5)
            refused = httpx.post(srv.url + "/v1/chat/completions", timeout=10,
                                 headers={"Authorization": f"Bearer {srv.keys['main']}"},
                                 json={"model": "medgemma-4b-it", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        except httpx.TransportError:
            pass  # already gone: also fine
        else:
            assert ready.status_code == 503 and health.status_code == 503
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
            assert int(refused.headers["retry-after"]) >= 1

        assert srv.process.wait(timeout=60) == 1
        log = srv.log()
        assert ("engine died" if fault == signal.SIGKILL else "engine hung") in log
    finally:
        if fault == signal.SIGSTOP:
            try:
                os.kill(core, signal.SIGKILL)
            except ProcessLookupError:
                pass
