"""Two server processes sharing one real Redis enforce one budget; a killed one frees its units."""

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
import redis as redis_sync

from tests.live_server import launch, stop, wait_for, wait_ready, write_keys
from tests.metrics_text import Sampler, metric
from tests.redis_server import RedisServer, leased_units
from tests.usage_holds import HeldUnits, records_through_the_end, request_times

LEASE_TTL_S = 6.0  # heartbeats every 2 s: a loaded 2-core machine can stall an event loop ~2 s
# A usage record's end is wall time to the millisecond: a release and the next grant can be closer.
CLOCK_SLACK_S = 0.02


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, server):
    root = tmp_path_factory.mktemp("replicas")
    redis = RedisServer(root / "redis").start()
    keys_file = root / "keys.yaml"
    keys = write_keys(keys_file, {"shared": "two"})
    # Two cores run three vLLM servers here: a generous Redis timeout keeps CPU starvation
    # from reading as a Redis outage (production default: 1 s).
    args = ("--redis-url", redis.url, "--lease-ttl-s", str(LEASE_TTL_S), "--redis-timeout-s", "5")
    pair = []
    try:
        for name in ("a", "b"):  # one at a time: start-up is the heaviest phase
            pair.append(launch(root / name, keys_file, keys, *args, dev_model_dir=server.dev_model_dir))
            wait_ready(pair[-1])
            pin_engines(pair[-1])
        yield pair, redis
    finally:
        for srv in pair:
            stop(srv)
        redis.stop()


def pin_engines(srv) -> None:
    """Engine processes onto the last core: vLLM CPU's engine core and worker spin at 100%
    while generating, which on two cores starves Redis and the other replica for seconds."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return
    for child in psutil.Process(srv.process.pid).children(recursive=True):
        if "VLLM" in child.name() or "VLLM" in " ".join(child.cmdline()[:1]):
            try:
                for thread in child.threads():
                    os.sched_setaffinity(thread.id, {cores[-1]})
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass


def chat(max_tokens: int, stream: bool) -> dict:
    return {
        "model": "medgemma-4b-it",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def namespace_pid(host_pid: int) -> int:
    """A process's pid inside its own pid namespace (the last NSpid field)."""
    status = Path(f"/proc/{host_pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1])


def test_replicas_that_share_a_pid_hold_distinct_leases_and_one_exact_budget(replicas):
    (a, b), redis = replicas
    assert namespace_pid(a.serving_pid) == namespace_pid(b.serving_pid) == 1  # as two pods
    probe = redis_sync.Redis.from_url(redis.url)
    key = a.keys["shared"]
    headers = {"Authorization": f"Bearer {key}"}
    long = {**chat(30000, True), "min_tokens": 30000}
    with httpx.Client(timeout=60) as client:
        opened = []
        try:
            for srv in (a, b):  # one stream on each replica: the plan's two units
                stream = client.stream("POST", srv.base_url + "/chat/completions", json=long, headers=headers)
                opened.append(stream)
                response = stream.__enter__()
                assert response.status_code == 200, (response.read(), srv.log()[-3000:])
            members = probe.zrange("medgemma:leases:{shared}", 0, -1)
            assert len(members) == 2, members  # one lease each, neither overwrote the other
            for srv in (a, b):  # the budget is full on both replicas
                refused = client.post(srv.base_url + "/chat/completions", json=chat(2, False), headers=headers)
                assert refused.status_code == 429, (refused.text, members)
            opened.pop(0).__exit__(None, None, None)  # A's client leaves: only A's lease goes
            deadline = time.monotonic() + 15
            while len(probe.zrange("medgemma:leases:{shared}", 0, -1)) != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            left = probe.zrange("medgemma:leases:{shared}", 0, -1)
            assert len(left) == 1 and left[0] in members, (left, members)
            again = client.post(b.base_url + "/chat/completions", json=chat(2, False), headers=headers)
            assert again.status_code == 200, again.text  # one unit free: exactly one
        finally:
            for stream in opened:
                try:
                    stream.__exit__(None, None, None)
                except httpx.HTTPError:
                    pass


def test_two_replicas_enforce_one_budget(replicas):
    (a, b), _ = replicas
    key = a.keys["shared"]

    async def one(client, srv):
        async with client.stream(
            "POST", srv.base_url + "/chat/completions", json=chat(400, True),
            headers={"Authorization": f"Bearer {key}"},
        ) as response:  # fmt: skip
            await response.aread()
            return response.status_code

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[one(client, srv) for srv in (a, b, a, b, a, b)])

    statuses = asyncio.run(scenario())
    assert sorted(statuses) == [200, 200, 429, 429, 429, 429], statuses
    text = httpx.get(a.url + "/metrics").text
    assert "medgemma_ledger_fallback 0.0" in text


def stream_loop(url: str, key: str, max_tokens: int, stop, results) -> None:
    """One client that keeps a stream running against a replica (429: retry soon). Runs in a
    process of its own: stream threads in the test process starve its samplers of the GIL."""
    body = {**chat(max_tokens, True), "min_tokens": max_tokens}
    statuses = []
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            status = 0
            try:
                with client.stream("POST", url + "/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as response:  # fmt: skip
                    status = response.status_code
                    for _ in response.iter_lines():
                        if stop.is_set():
                            break
            except httpx.HTTPError:
                pass
            statuses.append(status)
            if status != 200:
                stop.wait(0.2)
    results.put(statuses)


def probe_during(seconds: float, servers, key: str) -> dict[str, list[int]]:
    """A non-streaming request (the openai client's default) to each replica about once a
    second for ``seconds``: an admission decision on each while the clients' own streams
    may all be held up. Returns each replica's statuses (0: no answer in time)."""
    body = chat(1, False)
    answers: dict[str, list[int]] = {"a": [], "b": []}
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=5, headers={"Authorization": f"Bearer {key}"}) as client:
        while time.monotonic() < deadline:
            for name, srv in zip(("a", "b"), servers):
                try:
                    answers[name].append(client.post(srv.url + "/v1/chat/completions", json=body).status_code)
                except httpx.TransportError:
                    answers[name].append(0)  # admitted, and its engine is held up
            time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
    return answers


def share_period(readings: list[dict], fallback: str, since: float) -> tuple[float, float]:
    """The first run of fallback readings of 1 after ``since``: when its last reading was
    asked for (the shares held at least until then), and when the first 0 after it was read
    (they had ended by then)."""
    last_share = None
    for reading in readings:
        if reading["_asked"] < since:
            continue
        if reading[fallback] == 1:
            last_share = reading["_asked"]
        elif last_share is not None:
            return last_share, reading["_t"]
    raise AssertionError(("the shares never applied, or never ended", last_share))


# One rerun: on two cores both replicas' vLLM workers share core 0 and an engine can stall
# for 40-52 s (see the comment at the share check). A defect that shows on every run fails
# the rerun too; one that shows now and then may pass it.
@pytest.mark.flaky(reruns=1, reruns_delay=10)
def test_a_redis_outage_under_load_keeps_each_replica_within_its_share(replicas, spawn_client):
    """Documented bound (serving/admission/redis_ledger.py): during an outage, and for one
    lease TTL after while the replicas rejoin, each replica admits only while its own units
    (held before + granted since) fit its share, and the shares sum to the budget; once
    both have rejoined every live lease is in Redis and the budget is exact again. Checked
    at every admission, from the usage records (exact holds), not by sampling a gauge."""
    (a, b), redis = replicas
    key = a.keys["shared"]  # plan "two": a share of 1 on each of two replicas
    probe = redis_sync.Redis.from_url(redis.url)
    stop, results = spawn_client.context.Event(), spawn_client.context.Queue()
    clients = [spawn_client(stream_loop, url, key, 100, stop, results) for url in (a.url, a.url, b.url, b.url)]
    fallback = "medgemma_ledger_fallback"
    with Sampler(a.url, fallback, interval_s=0.1) as on_a, Sampler(b.url, fallback, interval_s=0.1) as on_b:
        time.sleep(12)  # the client processes start (seconds), then load both replicas
        killed_at = time.monotonic()
        redis.process.kill()
        redis.process.wait()
        try:
            assert wait_for(lambda: on_a.latest(fallback) == on_b.latest(fallback) == 1, 15), \
                ("fallback never flipped", on_a.errors[-3:], on_b.errors[-3:])  # fmt: skip
            probed = probe_during(20, (a, b), key)
        finally:
            restart_at = time.monotonic()
            redis.start()  # empty: the heartbeats put the live leases back
        back_at = time.monotonic()
        # Rejoining lasts one lease TTL after a heartbeat reaches Redis (every TTL/3).
        assert wait_for(lambda: on_a.latest(fallback) == on_b.latest(fallback) == 0, LEASE_TTL_S + 20), \
            "fallback never cleared"  # fmt: skip
        redis_totals = []
        while time.monotonic() < back_at + LEASE_TTL_S + 15:
            redis_totals.append(leased_units(redis.url, "shared"))
            time.sleep(0.1)
        stop.set()
        statuses = [status for _ in clients for status in results.get(timeout=120)]
    records = {name: records_through_the_end(srv, key) for name, srv in (("a", a), ("b", b))}
    held = {name: HeldUnits(recs) for name, recs in records.items()}
    both = HeldUnits(records["a"] + records["b"])
    shared_again = 0.0
    for name, sampler in (("a", on_a), ("b", on_b)):
        # Shares applied from the kill (a grant Redis made just before it may be admitted a
        # moment later: a stalled event loop, 2 s) until this replica's last reading of 1 was
        # asked for, and for at least a lease TTL after Redis came back (the rejoin).
        last_share, cleared = share_period(sampler.readings, fallback, killed_at)
        assert cleared >= restart_at + LEASE_TTL_S, (name, "left the shares before a TTL of rejoining",
                                                     round(cleared - restart_at, 2))  # fmt: skip
        shared_again = max(shared_again, cleared)
        admitted = held[name].admitted_between(killed_at + 2, last_share)
        over = [(round(t - killed_at, 3), held[name].held_at(t + CLOCK_SLACK_S, CLOCK_SLACK_S)) for t in admitted]
        assert all(units <= 1 for _, units in over), (name, "admitted over its share of 1", over)
        # And the share is usable: during the outage a refusal only ever came while the
        # replica's share was in use (a hold ends in its record a moment before its units
        # are free: hence the tenth of a second). Not "it served": on these two cores both
        # vLLM CPU workers bind to core 0, and an idle engine can stall for tens of seconds
        # while the other generates - the streams it admitted then hold the share through
        # the outage, which is right, and the clients behind them send nothing new; the
        # test's own probes make sure each replica decided requests in the outage.
        # (Rejoining, Redis may refuse too: the other replica's leases are back.)
        assert set(probed[name]) <= {200, 429, 0} and set(probed[name]) & {200, 429}, \
            (name, "the probes were not all admitted or refused for the budget", probed[name])  # fmt: skip
        decided = [(r["status"], start, end) for r, start, end in request_times(records[name])
                   if killed_at + 2 <= start <= restart_at]  # fmt: skip
        assert decided, (name, "no request decided during the outage", probed[name])
        refused = [(start, end) for status, start, end in decided if status is not None and status >= 400]
        idle = [round(start - killed_at, 3) for start, end in refused if held[name].peak(start - 0.1, end)[0] < 1]
        assert not idle, (name, "refused with its share unused, at (s after the kill)", idle)
    # The shares were not zero: a replica with its share free admitted during the outage
    # (the probes ask each replica every second).
    assert both.admitted_between(killed_at + 2, restart_at), "no replica admitted anything during the outage"
    # Once both rejoined: no admission above the budget, across both replicas.
    after = [(round(t - killed_at, 3), both.held_at(t + CLOCK_SLACK_S, CLOCK_SLACK_S))
             for t in both.admitted_between(shared_again, float("inf"))]  # fmt: skip
    assert all(units <= 2 for _, units in after), ("admitted over the budget of 2 after rejoining", after)
    assert max(redis_totals[len(redis_totals) // 2:]) <= 2, redis_totals
    assert 200 in statuses and 429 in statuses, statuses
    assert wait_for(lambda: not probe.zrange("medgemma:leases:{shared}", 0, -1), 20)
    assert wait_for(lambda: metric(a.url, "medgemma_inflight_units") == metric(b.url, "medgemma_inflight_units") == 0, 20)
    # Exact again: two long streams take the whole budget, a third is refused.
    test_replicas_that_share_a_pid_hold_distinct_leases_and_one_exact_budget(replicas)


def test_refuse_mode_answers_503_ledger_unavailable_while_redis_is_down(replicas, tmp_path):
    (a, b), redis = replicas
    refusing = launch(tmp_path / "refuse", a.keys_file, a.keys, "--redis-url", redis.url, "--ledger-fallback", "refuse",
                      "--redis-timeout-s", "5", "--lease-ttl-s", str(LEASE_TTL_S), dev_model_dir=a.dev_model_dir)  # fmt: skip
    fallback = "medgemma_ledger_fallback"
    with Sampler(a.url, fallback, interval_s=0.1) as on_a, Sampler(b.url, fallback, interval_s=0.1) as on_b:
        refuse_through_an_outage(refusing, a.keys["shared"], redis)
        # The module's replicas lose their registration with the restart and rejoin (a lease
        # TTL): the next test starts once both have been through it.
        assert wait_for(lambda: on_a.highest(fallback) == on_b.highest(fallback) == 1, LEASE_TTL_S + 20)
        assert wait_for(lambda: on_a.latest(fallback) == on_b.latest(fallback) == 0, LEASE_TTL_S + 20)


def refuse_through_an_outage(refusing, key: str, redis) -> None:
    try:
        wait_ready(refusing)
        headers = {"Authorization": f"Bearer {key}"}
        url = refusing.base_url + "/chat/completions"
        assert httpx.post(url, json=chat(2, False), headers=headers, timeout=60).status_code == 200
        redis.process.kill()
        redis.process.wait()
        try:
            refused = httpx.post(url, json=chat(2, False), headers=headers, timeout=60)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "ledger_unavailable"
            assert int(refused.headers["retry-after"]) >= 1
            assert metric(refusing.url, "medgemma_ledger_fallback") == 1
        finally:
            redis.start()
        # Rejoining (one lease TTL) it grants within its share of the three replicas' - maybe 0.
        assert wait_for(lambda: httpx.post(url, json=chat(2, False), headers=headers, timeout=60).status_code == 200,
                        LEASE_TTL_S + 20)  # fmt: skip
    finally:
        stop(refusing)


# Last: it kills replica B for good.
def test_kill_9_of_a_replica_frees_its_units_within_the_ttl(replicas):
    (a, b), redis = replicas
    probe = redis_sync.Redis.from_url(redis.url)

    def leases():
        return probe.zrange("medgemma:leases:{shared}", 0, -1, withscores=True), probe.time()

    # Units are released just after a response's last byte: the previous test's may still be
    # on their way to Redis when this one starts (seconds, when this VM stalls a process).
    deadline = time.monotonic() + 15
    while leases()[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not leases()[0], leases()
    headers = {"Authorization": f"Bearer {b.keys['shared']}"}
    url_b, url_a = b.base_url + "/chat/completions", a.base_url + "/chat/completions"
    with httpx.Client(timeout=60) as client:
        streams = [client.stream("POST", url_b, json=chat(30000, True), headers=headers) for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        refused = [(r.headers, r.read()) for r in responses if r.status_code != 200]
        assert [r.status_code for r in responses] == [200, 200], (refused, leases(), b.log()[-3000:])
        # Keep the line iterators: a dropped one closes its connection (a disconnect).
        line_iters = [response.iter_lines() for response in responses]
        for lines in line_iters:
            next(lines)
        before_kill = leases()
        assert len(before_kill[0]) == 2, (before_kill, b.log()[-3000:])
        killed_at = time.monotonic()
        stop(b, signal.SIGKILL)
        # Right after the kill, B's leases still hold the budget in Redis ...
        right_after = client.post(url_a, json=chat(2, False), headers=headers)
        assert right_after.status_code == 429, (leases(), right_after.headers, b.log()[-3000:])
        # ... and they expire within the lease TTL.
        while time.monotonic() - killed_at < LEASE_TTL_S + 4:
            if client.post(url_a, json=chat(2, False), headers=headers).status_code == 200:
                break
            time.sleep(0.1)
        freed_after = time.monotonic() - killed_at
        for stream in streams:
            try:
                stream.__exit__(None, None, None)
            except httpx.HTTPError:
                pass
    # Leases expire TTL after their last renewal; allow for the poll and a loaded machine.
    assert freed_after <= LEASE_TTL_S + 2.5, freed_after
