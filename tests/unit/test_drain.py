import asyncio

from serving.admission.outcomes import Outcome
from serving.drain import Drainer


class FakeAdmission:
    """Admission's public surface as the drainer uses it: drain, busy, end_running."""

    def __init__(self, busy_values, calls):
        self.calls = calls
        self._busy = iter(busy_values)
        self._last = 0

    def drain(self):
        self.calls["draining"] += 1

    def busy(self):
        self._last = next(self._busy, self._last)
        return self._last

    async def end_running(self, outcome, message):
        import time

        assert outcome is Outcome.EVICTED_DRAINED
        self.calls["ended"].append(message)
        self.calls["ended_at"] = time.monotonic()


def make(busy_values, grace_s=5.0):
    calls = {"draining": 0, "ended": [], "shutdown": 0}
    drainer = Drainer(
        grace_s=grace_s,
        admission=FakeAdmission(busy_values, calls),
        shutdown=lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1),
    )
    return drainer, calls


def test_waits_for_admitted_requests_then_shuts_down(monkeypatch):
    monkeypatch.setattr("serving.drain.POLL_S", 0.001)

    async def scenario():
        drainer, calls = make([3, 3, 2, 1, 0])
        drainer.begin()
        drainer.begin()  # a second SIGTERM changes nothing
        await asyncio.wait_for(drainer.task, 2)
        return drainer, calls

    drainer, calls = asyncio.run(scenario())
    assert drainer.draining and calls == {"draining": 1, "ended": [], "shutdown": 1}


def test_ends_the_rest_at_the_grace_period(monkeypatch):
    monkeypatch.setattr("serving.drain.POLL_S", 0.001)

    async def scenario():
        drainer, calls = make([2] * 10_000, grace_s=0.05)
        drainer.begin()
        await asyncio.wait_for(drainer.task, 2)
        return drainer, calls

    drainer, calls = asyncio.run(scenario())
    assert calls["shutdown"] == 1 and len(calls["ended"]) == 1
    assert "retry" in calls["ended"][0]
    assert calls["ended_at"] >= drainer.started_at + 0.05  # not before the grace period was over
