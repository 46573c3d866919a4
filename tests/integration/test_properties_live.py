"""A randomized test of the admission invariants against the real server.

Three accounts with budgets of 1, 2 and 3 units send random mixes for about a minute:
streams and non-streaming requests, ``n`` > 1, batched completions, images, clients that
leave at a random point and clients that read slowly. The units held are known exactly,
from each admitted request's usage record (when it got its units, when it released them);
a sampler reads vLLM's ``vllm:num_requests_running`` from ``/metrics`` throughout. The
invariants:
- no account ever holds more units than its budget;
- the engine never runs more requests than the units admitted: each figure of vLLM's gauge,
  where it is fresh (it changed, or vLLM recorded an engine step since the reading before),
  is at most the most units held at one moment in the ``ENGINE_LAG_S`` before (vLLM updates
  its gauge once per engine step, leaves it standing between steps, and aborts a departed
  client's request a moment after we release: its hold counts that much longer);
- at the end no unit is held and no engine request runs (``medgemma_inflight_units``).
With several API processes vLLM sends each step's scheduler statistics to one of them, and
that process writes ``vllm:num_requests_running`` when its event loop gets to it, with the
time of writing: a busy process can publish a figure seconds old as the newest, and leave
it standing once the engine is idle. So the lag allowed there is longer, and before each
idle check one 1-token request makes the engine publish a fresh figure.
The request mix is drawn from a seed printed in every failure; rerun a failing one with
MEDGEMMA_PROPERTY_SEED=<seed>. It runs against the one-process server and against the same
server with two API processes (``--api-processes 2``): there each budget is one host ledger
shared by both, and ``/metrics`` adds both processes' units up.
"""

from __future__ import annotations

import base64
import io
import os
import random
import re
import time

import httpx
import pytest

from tests.live_server import usage_by_process, wait_for
from tests.metrics_text import Sampler, samples, scrape
from tests.usage_holds import HeldUnits, records_through_the_end

BUDGETS = {"prop-a": ("prop1", 1), "prop-b": ("prop2", 2), "prop-c": ("prop3", 3)}  # account: (plan, units)
CLIENTS = 4
DURATION_S = 60.0
ENGINE_LAG_S = {"server": 2.0, "multi_server": 6.0}
MODEL = "medgemma-4b-it"
# A record's times are its end, a wall clock time to the millisecond, less monotonic
# differences; a one-process release and the next grant can be closer than that.
CLOCK_SLACK_S = 0.02


def tiny_image() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), 120).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def one_request(client: httpx.Client, url: str, key: str, rng: random.Random, image: str) -> str:
    """Send one random request; returns what kind it was and how it ended."""
    kind = rng.choice(["stream", "plain", "n2", "batch", "image", "leave", "slow"])
    max_tokens = rng.randint(1, 120)
    headers = {"Authorization": f"Bearer {key}"}
    messages = [{"role": "user", "content": "Describe a chest film."}]
    chat = {"model": MODEL, "messages": messages, "max_tokens": max_tokens}
    if kind == "n2":
        chat["n"] = 2
    if kind == "image":
        chat["messages"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                         {"type": "text", "text": "What is this?"}]}]  # fmt: skip
    path, body = "/v1/chat/completions", chat
    if kind == "batch":
        prompts = [f"Report {i}:" for i in range(rng.randint(2, 3))]
        path, body = "/v1/completions", {"model": MODEL, "prompt": prompts, "max_tokens": max_tokens}
    stream = kind in ("stream", "leave", "slow") or (kind in ("batch", "image") and rng.random() < 0.5)
    body = {**body, "stream": stream}
    if not stream:
        if kind == "plain" and rng.random() < 0.3:  # a non-streaming client that gives up early
            try:
                client.post(url + path, json={**body, "min_tokens": 2000, "max_tokens": 2000}, headers=headers,
                            timeout=httpx.Timeout(30, read=rng.uniform(0.2, 2.0)))  # fmt: skip
            except httpx.TimeoutException:
                return "plain-left"
            return "plain-left-late"
        response = client.post(url + path, json=body, headers=headers, timeout=120)
        return f"{kind}-{response.status_code}"
    leave_after = rng.randint(1, 20) if kind == "leave" else None
    with client.stream("POST", url + path, json=body, headers=headers, timeout=120) as response:
        for i, _ in enumerate(response.iter_lines()):
            if leave_after is not None and i >= leave_after:
                return "left"  # closing the stream disconnects
            if kind == "slow":
                time.sleep(rng.uniform(0.02, 0.15))
        return f"{kind}-{response.status_code}"


def client_loop(url: str, keys: dict[str, str], seed: int, index: int, deadline_s: float, results) -> None:
    """One client process: random requests from its own stream of the seed until the deadline."""
    rng = random.Random(f"{seed}-{index}")
    image = tiny_image()
    ended: dict[str, int] = {}
    stop_at = time.monotonic() + deadline_s
    with httpx.Client() as client:
        while time.monotonic() < stop_at:
            account = rng.choice(sorted(keys))
            try:
                outcome = one_request(client, url, keys[account], rng, image)
            except httpx.HTTPError as exc:
                outcome = f"error-{type(exc).__name__}"
            ended[outcome] = ended.get(outcome, 0) + 1
            if outcome.endswith("-429"):
                time.sleep(rng.uniform(0.05, 0.3))
    results.put(ended)


def refresh_engine_gauge(url: str, key: str) -> None:
    """One 1-token request: its last engine step publishes the engine's running count."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    response = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 200, response.text[:300]


def warnings_in(log: str, last: int = 15) -> list[str]:
    """The server's last warning and error lines (it never logs request content)."""
    return [line[-300:] for line in log.splitlines() if re.search(r"WARNING|ERROR|Traceback", line)][-last:]


def idle_in(found: list) -> bool:
    """Nothing admitted and nothing in the engine, in one scrape's samples."""
    return not any(v for n, _, v in found if n in ("medgemma_inflight_units", "vllm:num_requests_running"))


def server_is_idle(url: str) -> bool:
    return idle_in(samples(scrape(url)))


# One rerun for this VM's multi-second stalls, which the lag-bound checks cannot tell from a
# defect. Until 2026-12-06 the units were sampled from /metrics, and a short request between
# two scrapes failed "the engine ran more than admitted" (CI twice); they are exact now. The
# summary prints the first try's failure (tests/conftest.py), and a rerun cannot hide a
# held unit: it starts by requiring an idle server.
@pytest.mark.flaky(reruns=1, reruns_delay=10)
@pytest.mark.parametrize("server_fixture", ["server", "multi_server"])
def test_no_account_exceeds_its_budget_and_the_engine_never_runs_more_than_admitted(server_fixture, request, spawn_client):
    server = request.getfixturevalue(server_fixture)
    seed = int(os.environ.get("MEDGEMMA_PROPERTY_SEED") or random.SystemRandom().randrange(10**6))
    where = f"{server_fixture}, seed {seed} (rerun: MEDGEMMA_PROPERTY_SEED={seed})"
    keys = {account: server.keys[account] for account in BUDGETS}
    results = spawn_client.context.Queue()
    engine, units = "vllm:num_requests_running", "medgemma_inflight_units"
    steps = "vllm:iteration_tokens_total_count"  # one more per engine step vLLM records, with the figure

    # The session server must be idle first: an earlier module's request still in the
    # engine would count against this test's admitted units.
    refresh_engine_gauge(server.url, keys["prop-c"])
    assert wait_for(lambda: server_is_idle(server.url), 60), f"{where}: the server is busy before the mix"
    lag_s = ENGINE_LAG_S[server_fixture]
    with Sampler(server.url, engine, units, steps, interval_s=0.05) as sampler:
        clients = [spawn_client(client_loop, server.url, keys, seed, i, DURATION_S, results) for i in range(CLIENTS)]
        outcomes: dict[str, int] = {}
        for _ in clients:
            for outcome, count in results.get(timeout=DURATION_S + 180).items():
                outcomes[outcome] = outcomes.get(outcome, 0) + count
        assert wait_for(lambda: not sampler.latest(units), 30), (
            f"{where}: units still held 30 s after the mix: {sampler.readings[-1]}; {outcomes}"
        )
        refresh_engine_gauge(server.url, keys["prop-c"])
        sampler_idle = wait_for(lambda: not (sampler.latest(units) or sampler.latest(engine)), 30, poll_s=0.2)
        sampler_age = time.monotonic() - sampler.readings[-1]["_t"]  # a scrape every 0.05 s, when all is well
    readings = sampler.readings
    assert len(readings) > 200, (where, sampler.errors[-3:])
    processes = 2 if server_fixture == "multi_server" else 1
    held = HeldUnits(records_through_the_end(server, keys["prop-c"], processes))
    for (_, budget), account in zip(BUDGETS.values(), BUDGETS):
        worst, at = held.peak(account=account, inset_s=CLOCK_SLACK_S)
        assert worst <= budget, (
            f"{where}: {account} held {worst} units of a budget of {budget}; its holds then (start, end, units, "
            f"account, request id, client left): {held.around(at, 5.0, account)}"
        )
    # vLLM's gauge stands between the engine steps it records (a departed client's abort
    # records none), so a figure is checked where it is fresh: where it changed or a step
    # was recorded since the reading before. Against it, every unit held in the lag before,
    # a departed client's until vLLM has aborted its request.
    figures = 0
    for before, reading in zip([None, *readings], readings):
        if before is not None and before[engine] == reading[engine] and before[steps] == reading[steps]:
            continue
        figures += 1
        admitted, _ = held.peak(since=reading["_t"] - lag_s, until=reading["_t"], left_extra_s=lag_s)
        assert reading[engine] <= admitted, (
            f"{where}: the engine ran {reading[engine]} requests with at most {admitted} units admitted in the "
            f"{lag_s} s before (t={reading['_t'] - readings[0]['_t']:.1f}s); held then (start, end, units, "
            f"account, request id, client left): {held.around(reading['_t'], lag_s)}; {outcomes}"
        )
    # At the end no unit is held and no engine request runs. The sampler has had 30 s to
    # see it; the server is read afresh too (a few seconds), so that a failure tells a held
    # unit from a stale reading, and says what the server logged.
    final: list[tuple] = []

    def settled() -> bool:
        nonlocal final
        found = samples(scrape(server.url))
        final = [(n, labels.get("plan"), v) for n, labels, v in found if n in (engine, units)]  # for the message
        return idle_in(found)  # every plan's units (not their sum: -1 and +1 would cancel) and the engine

    fresh_idle = wait_for(settled, 5, poll_s=0.5)
    assert sampler_idle and fresh_idle, (
        f"{where}: left over at the end: the server read afresh: {final}; the sampler "
        f"{'did' if sampler_idle else 'did not'} see it idle within 30 s (its last reading, {sampler_age:.1f} s old "
        f"then: {readings[-1]}; its errors: {sampler.errors[-3:]}); {outcomes}; the server's warnings: "
        f"{warnings_in(server.log())}"
    )
    # No server error and no broken connection, whatever the mix did.
    broken = {o: n for o, n in outcomes.items() if o.startswith("error-") or re.search(r"-5\d\d$", o)}
    assert not broken, (where, broken, outcomes)
    # The mix really happened: each kind succeeded, clients left, the limits refused.
    for kind in ("stream", "plain", "n2", "batch", "image", "slow"):
        assert outcomes.get(f"{kind}-200"), (where, kind, outcomes)
    assert outcomes.get("left") and any(o.endswith("-429") for o in outcomes), (where, outcomes)
    if server_fixture == "multi_server":  # both API processes decided some of the mix
        decided = {p: sum(r.get("account") in BUDGETS for r in recs) for p, recs in usage_by_process(server).items()}
        assert all(decided.values()), (where, decided)
    mix = [i for i in held.intervals if i[0] >= readings[0]["_t"]]
    print(f"property test {where}: {sum(outcomes.values())} requests {outcomes}; {len(mix)} admitted, "
          f"{figures} engine figures checked, the most units held at once {held.peak(since=readings[0]['_t'])[0]}")  # fmt: skip
