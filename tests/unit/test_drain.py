import asyncio

from serving.drain import Drainer


def make(busy_values, grace_s=5.0):
    calls = {"draining": 0, "ended": [], "shutdown": 0}
    busy = iter(busy_values)
    last = {"v": 0}

    def busy_now():
        last["v"] = next(busy, last["v"])
        return last["v"]

    async def end_all(message):
        calls["ended"].append(message)

    drainer = Drainer(
        grace_s=grace_s,
        set_draining=lambda: calls.__setitem__("draining", calls["draining"] + 1),
        busy=busy_now,
        end_all=end_all,
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
        return calls

    calls = asyncio.run(scenario())
    assert calls["shutdown"] == 1 and len(calls["ended"]) == 1
    assert "retry" in calls["ended"][0]
