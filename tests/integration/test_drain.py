"""SIGTERM drains: /ready turns 503, new requests get 503 draining, admitted requests finish,
the ones still running at the end of the grace period end with a clear error, exit 0."""

import json
import signal
import subprocess
import time

import httpx
import pytest

from tests.live_server import launch, stop, wait_ready, write_keys
from tests.metrics_text import metric

# This machine (a VM) sometimes stalls one process for up to ~50 s under load, so every
# window here is wide: the short stream runs ~30-60 s (surely still running at SIGTERM),
# well inside the grace period. The long one must outlast the grace period on any host: one
# stream here made 25,000 tokens by the end of it (CI once finished 30,000 in time), so the
# server gets MedGemma's whole 128K context and the long stream asks for nearly all of it.
GRACE_S = 120
SHORT, LONG = 6000, 120_000  # output tokens
MAX_MODEL_LEN = 131_072


@pytest.fixture
def draining_server(tmp_path_factory, server):
    root = tmp_path_factory.mktemp("drain")
    keys_file = root / "keys.yaml"
    keys = write_keys(keys_file, {"main": "big"})
    srv = launch(root, keys_file, keys, "--drain-timeout-s", str(GRACE_S), "--max-model-len", str(MAX_MODEL_LEN),
                 dev_model_dir=server.dev_model_dir)
    try:
        wait_ready(srv)
        yield srv
    finally:
        stop(srv, signal.SIGKILL)


def get_while_draining(srv, path: str) -> httpx.Response:
    """GET during the drain. Seen twice in CI, not reproduced by hand: the port refused
    connections right after SIGTERM while the drain went on. Say what was listening then."""
    refused = None
    for _ in range(10):
        try:
            return httpx.get(srv.url + path, timeout=10)
        except httpx.ConnectError as exc:
            refused = exc
            time.sleep(0.3)
    listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    raise AssertionError(f"{srv.url} refused connections while draining ({refused}); alive: "
                         f"{srv.process.poll() is None}\n{listening}\n{srv.log()[-4000:]}")  # fmt: skip


def inflight_units(srv) -> float:
    return metric(srv.url, "medgemma_inflight_units", plan="big")


def stream_events(url: str, key: str, max_tokens: int, started, go, results) -> None:
    """Stream one chat request; report its status, data events and when it ended.

    Runs in its own process: a thread that always has stream data to read holds the GIL
    so long (the convoy effect) that the test's own probes were delayed by seconds.
    """
    body = {
        "model": "medgemma-4b-it", "messages": [{"role": "user", "content": "Describe a chest film."}],
        "max_tokens": max_tokens, "min_tokens": max_tokens, "stream": True,
    }  # fmt: skip
    out = {}
    headers = {"Authorization": f"Bearer {key}"}
    started.put(max_tokens)
    go.wait(60)  # both client processes start their streams together, once both are up
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=120) as r:
        out["status"] = r.status_code
        out["events"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    out["ended"] = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
    results.put((max_tokens, out))


# Its CI failures (probes unanswered for ~100 s while two streams ran) were vLLM CPU's
# EngineCore starving the API server: fixed in serving/cpuaffinity.py. One rerun with a
# fresh server stays for this VM's multi-second stalls; a second failure is a real one.
@pytest.mark.flaky(reruns=1, reruns_delay=10)
def test_sigterm_drains_admitted_requests_then_exits_0(draining_server, spawn_client):
    srv = draining_server
    spawn = spawn_client.context
    results, started, go = spawn.Queue(), spawn.Queue(), spawn.Event()
    clients = [spawn_client(stream_events, srv.url, srv.keys["main"], n, started, go, results) for n in (SHORT, LONG)]
    for _ in clients:
        started.get(timeout=120)  # spawned interpreters import httpx: seconds on a busy machine
    go.set()
    deadline = time.monotonic() + 60
    while inflight_units(srv) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    if inflight_units(srv) != 2:
        ended = []
        while not results.empty():
            n, out = results.get()
            ended.append((n, out.get("status"), out.get("events", [])[-2:]))
        raise AssertionError(f"inflight units {inflight_units(srv)}, not 2, 60 s after both clients were told to go; "
                             f"ended: {ended}; client exit codes: {[c.exitcode for c in clients]}\n"
                             f"{srv.log()[-4000:]}")  # fmt: skip
    sent = time.monotonic()
    srv.send_signal(signal.SIGTERM)
    time.sleep(0.3)

    ready = get_while_draining(srv, "/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    refused = httpx.post(
        srv.url + "/v1/chat/completions", timeout=10, headers={"Authorization": f"Bearer {srv.keys['main']}"},
        json={"model": "medgemma-4b-it", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )  # fmt: skip
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "draining"
    assert int(refused.headers["retry-after"]) >= 1
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # alive while draining

    ended = dict(results.get(timeout=GRACE_S + 120) for _ in clients)
    short, long = ended[SHORT], ended[LONG]
    for c in clients:
        c.join(timeout=10)
    # The short stream ran to its natural end.
    assert short["status"] == 200 and short["events"][-1] == "[DONE]"
    assert all("error" not in json.loads(e) for e in short["events"][:-1])
    assert short["ended"] - sent < GRACE_S
    # The long one was ended at the grace period, with an error event the client can read.
    assert long["status"] == 200 and long["events"][-1] == "[DONE]"
    last = json.loads(long["events"][-2])
    assert "error" in last, (f"the long stream ended without the drain's error, {long['ended'] - sent:.0f} s after "
                             f"SIGTERM, {len(long['events'])} events: {long['events'][-3:]}")  # fmt: skip
    error = last["error"]
    assert error["code"] == "draining" and "retry" in error["message"].lower()
    assert GRACE_S - 1 < long["ended"] - sent < GRACE_S + 60

    assert srv.process.wait(timeout=60) == 0
    log = srv.log()
    assert "2 admitted requests may finish" in log
    assert f"drain: grace period of {GRACE_S}s over; ending 1 requests" in log
    assert "drain: done" in log
    # One usage record each (written before the process exited): the short stream completed
    # with all its tokens, the long one was drained, the refusal is a 503 draining.
    records = [json.loads(line) for line in srv.usage_log.read_text().splitlines()]
    by_outcome = sorted((r["outcome"], r["status"], r["error_code"]) for r in records if r["kind"] == "request")
    assert by_outcome == [("completed", 200, None), ("evicted_drained", 200, "draining"),
                          ("rejected_draining", 503, "draining")], by_outcome  # fmt: skip
    completed = next(r for r in records if r.get("outcome") == "completed")
    drained = next(r for r in records if r.get("outcome") == "evicted_drained")
    assert completed["completion_tokens"] == SHORT and 0 < drained["completion_tokens"] < LONG
    assert drained["unit_seconds"] >= GRACE_S - 1
