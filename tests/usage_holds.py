"""Units held over time, exactly, from a live server's usage records.

Each admitted request's record says when it got its units (arrival + queue wait) and how
long it held them (``unit_seconds / units``), so tests check budgets at every moment rather
than sampling a gauge between scrapes."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx

from tests.live_server import usage_by_process, wait_for
from tests.metrics_text import metric


def request_times(records: list[dict]) -> list[tuple[dict, float, float]]:
    """Each request record (a key reload's audit records share the file) with its arrival
    and its end on this process's monotonic clock."""
    to_monotonic = time.time() - time.monotonic()
    times = []
    for r in records:
        if r["kind"] == "request":
            ended = datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp() - to_monotonic
            times.append((r, ended - r["e2e_s"], ended))
    return times


class HeldUnits:
    """The units the server held over time, exactly: each admitted request's interval from
    its usage record (admitted after its units were granted, released before they were
    freed: inside the true hold), on this test's monotonic clock. Sampling the gauge
    instead misses a short request between two scrapes."""

    def __init__(self, records: list[dict]):
        self.intervals = []  # (start, end, units, account, request id, its client left)
        for r, arrived, _ in request_times(records):
            if r["units"] and r["queue_wait_s"] is not None:
                start = arrived + r["queue_wait_s"]
                end = start + r["unit_seconds"] / r["units"]
                self.intervals.append((start, end, r["units"], r["account"], r["request_id"], r["client_left"]))

    def peak(self, since: float = float("-inf"), until: float = float("inf"), account: str | None = None,
             inset_s: float = 0.0, left_extra_s: float = 0.0) -> tuple[int, float]:  # fmt: skip
        """The most units held at one moment between ``since`` and ``until`` (by ``account``, or
        by all), and that moment; each interval shortened by ``inset_s`` at both ends, and
        one whose client left lengthened by ``left_extra_s`` (vLLM aborts it a moment later)."""
        mine = [(s + inset_s, e - inset_s + (left_extra_s if left else 0.0), u)
                for s, e, u, a, _, left in self.intervals if account in (None, a)]  # fmt: skip
        mine = [i for i in mine if i[0] <= until and i[1] > since]
        moments = [since] + [s for s, _, _ in mine if s > since]
        return max(((sum(u for s, e, u in mine if s <= t < e), t) for t in moments), default=(0, since))

    def held_at(self, t: float, inset_s: float = 0.0) -> int:
        """The units held at the moment ``t`` (each interval shortened by ``inset_s``)."""
        return sum(u for s, e, u, *_ in self.intervals if s + inset_s <= t < e - inset_s)

    def admitted_between(self, since: float, until: float) -> list[float]:
        """The moments requests were admitted (got their units) between the two."""
        return sorted(s for s, *_ in self.intervals if since <= s <= until)

    def around(self, at: float, span_s: float, account: str | None = None) -> list[tuple]:
        """The intervals held in the ``span_s`` before ``at``, relative to it (for messages)."""
        return [(round(s - at, 3), round(e - at, 3), u, a, rid, left) for s, e, u, a, rid, left in self.intervals
                if s <= at and e > at - span_s and account in (None, a)]  # fmt: skip


def records_through_the_end(server, key: str, processes: int = 1) -> list[dict]:
    """Every usage record of the server, once each of its ``processes`` API processes has
    written a request sent after the test's own (one writer thread per process writes in
    order, so all came before it). ``key``'s account must have a unit free."""
    marker = f"prop-end-{time.monotonic_ns()}"
    body = {"model": "medgemma-4b-it", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"Authorization": f"Bearer {key}", "x-request-id": marker}

    def by_process() -> dict[int, list[dict]]:
        if processes > 1:
            return usage_by_process(server, processes)
        return {0: [json.loads(line) for line in server.usage_log.read_text().splitlines()]}

    def post(_) -> None:
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)

    found: dict[int, list[dict]] = {}

    def every_process_wrote_one() -> bool:
        nonlocal found
        found = by_process()
        if all(any(r.get("request_id") == marker for r in recs) for recs in found.values()):
            return True
        # several at once: the kernel can hand one connection after another to the same
        # process, never to a busy one (a refusal's record counts too)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(post, range(4)))
        return False

    assert wait_for(every_process_wrote_one, 60, poll_s=0.5), f"no usage record of {marker} from every process"
    assert metric(server.url, "medgemma_usage_records_dropped_total") == 0, "usage records were dropped"
    return [r for recs in found.values() for r in recs]
