import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from serving.admission.clock import FakeClock
from serving.admission.controller import AdmissionController, RequestShape, retry_after_s
from serving.admission.keys import KeyStore
from serving.admission.ledger import InProcessLedger
from serving.admission.outcomes import AdmissionError, Outcome
from serving.admission.queue import Capacity, FairQueue
from serving.metrics import ServingMetrics

KEYS = {
    "plans": {
        "small": {"concurrency": 2},
        "waits": {"concurrency": 1, "queue": {"max_waiting": 1, "timeout_s": 5}},
        "big": {"concurrency": 10},
    },
    "accounts": {"a": {"plan": "small"}, "w": {"plan": "waits"}, "b": {"plan": "big"}},
}


def make(max_requests=8, max_waiting=4, max_model_len=4096):
    clock = FakeClock()
    metrics = ServingMetrics(CollectorRegistry())
    ledger = InProcessLedger()
    controller = AdmissionController(
        KeyStore.from_dict(KEYS),
        ledger,
        FairQueue(Capacity(max_requests, 100_000), max_waiting, clock),
        metrics,
        max_model_len=max_model_len,
        model_costs={"medgemma-4b-it": 1, "big-model": 4},
        queue_timeout_s=10,
        clock=clock,
    )
    return controller, clock, ledger, metrics


def shape(prompt=10, max_tokens=10, model="medgemma-4b-it"):
    return RequestShape(model=model, prompt_tokens=prompt, max_tokens=max_tokens)


def account(controller, name):
    return controller.keys.accounts[name]


def text(metrics):
    return generate_latest(metrics.registry).decode()


def test_budget_is_enforced_and_released():
    async def scenario():
        c, _, ledger, metrics = make()
        a = account(c, "a")
        t1 = await c.admit(a, shape())
        t2 = await c.admit(a, shape())
        assert (t1.remaining, t2.remaining) == (1, 0)
        with pytest.raises(AdmissionError) as info:
            await c.admit(a, shape())
        assert info.value.outcome is Outcome.REJECTED_OVER_BUDGET
        assert info.value.retry_after_s >= 1
        await t1.release()
        await t1.release()  # idempotent
        assert await ledger.inflight("a") == 1
        t3 = await c.admit(a, shape())
        await t2.release()
        await t3.release()
        assert ledger.total_inflight() == 0 and c.queue.inflight_requests == 0
        out = text(metrics)
        assert 'medgemma_admission_total{outcome="admitted"} 3.0' in out
        assert 'medgemma_admission_total{outcome="rejected_concurrency_limit"} 1.0' in out
        assert 'medgemma_inflight_units{plan="small"} 0.0' in out
        assert "medgemma_capacity_units 8.0" in out
    asyncio.run(scenario())


def test_model_cost_table():
    async def scenario():
        c, _, ledger, _ = make()
        b = account(c, "b")
        await c.admit(b, shape(model="big-model"))
        assert await ledger.inflight("b") == 4
        with pytest.raises(AdmissionError):
            await c.admit(account(c, "a"), shape(model="big-model"))  # 4 > 2
    asyncio.run(scenario())


def test_context_length_is_refused_before_anything_is_held():
    async def scenario():
        c, _, ledger, _ = make(max_model_len=1000)
        with pytest.raises(AdmissionError) as info:
            await c.admit(account(c, "a"), shape(prompt=600, max_tokens=500))
        assert info.value.outcome is Outcome.REJECTED_CONTEXT_LENGTH
        assert "1000" in info.value.message
        assert ledger.total_inflight() == 0
        with pytest.raises(AdmissionError):
            await c.admit(account(c, "a"), shape(prompt=1001, max_tokens=None))
        ticket = await c.admit(account(c, "a"), shape(prompt=600, max_tokens=None))
        assert ticket.slot.tokens == 1000  # no max_tokens: the rest of the context
    asyncio.run(scenario())


def test_draining_refuses_new_requests():
    async def scenario():
        c, _, _, _ = make()
        c.draining = True
        with pytest.raises(AdmissionError) as info:
            await c.admit(account(c, "a"), shape())
        assert info.value.outcome is Outcome.REJECTED_DRAINING
    asyncio.run(scenario())


def test_plan_queue_waits_at_the_limit_then_gets_the_freed_unit():
    async def scenario():
        c, _, _, _ = make()
        w = account(c, "w")
        held = await c.admit(w, shape())
        waiting = asyncio.ensure_future(c.admit(w, shape()))
        await asyncio.sleep(0)
        assert not waiting.done()
        with pytest.raises(AdmissionError) as info:  # the plan queue holds one
            await c.admit(w, shape())
        assert info.value.outcome is Outcome.REJECTED_OVER_BUDGET
        await held.release()
        ticket = await asyncio.wait_for(waiting, 1)
        assert ticket.inflight_after == 1
    asyncio.run(scenario())


def test_plan_queue_deadline_gives_429_without_sleeping():
    async def scenario():
        c, clock, ledger, _ = make()
        w = account(c, "w")
        await c.admit(w, shape())
        waiting = asyncio.ensure_future(c.admit(w, shape()))
        await asyncio.sleep(0)
        clock.advance(5.1)
        await c.tick()
        with pytest.raises(AdmissionError) as info:
            await waiting
        assert info.value.outcome is Outcome.REJECTED_OVER_BUDGET
        assert "waited" in info.value.message
        assert await ledger.inflight("w") == 1
    asyncio.run(scenario())


def test_waiters_of_an_account_removed_by_a_key_reload_still_expire():
    async def scenario():
        c, clock, ledger, _ = make()
        w = account(c, "w")
        held = await c.admit(w, shape())
        waiting = asyncio.ensure_future(c.admit(w, shape()))
        await asyncio.sleep(0)
        assert c._has_waiters()
        c.keys = KeyStore.from_dict({**KEYS, "accounts": {"a": {"plan": "small"}}})  # "w" is gone
        clock.advance(2)
        await c.tick()
        assert not waiting.done()  # its deadline has not come
        clock.advance(3.1)
        await c.tick()
        with pytest.raises(AdmissionError) as info:
            await asyncio.wait_for(waiting, 1)
        assert info.value.outcome is Outcome.REJECTED_OVER_BUDGET
        await asyncio.sleep(0)
        assert not c._has_waiters()  # the ticker may sleep again
        await held.release()
        assert ledger.total_inflight() == 0
    asyncio.run(scenario())


def test_a_waiter_of_a_removed_account_gets_the_unit_its_account_frees():
    async def scenario():
        c, _, _, _ = make()
        w = account(c, "w")
        held = await c.admit(w, shape())
        waiting = asyncio.ensure_future(c.admit(w, shape()))
        await asyncio.sleep(0)
        c.keys = KeyStore.from_dict({**KEYS, "accounts": {"a": {"plan": "small"}}})
        await held.release()
        ticket = await asyncio.wait_for(waiting, 1)
        await ticket.release()
        assert not c._has_waiters()
    asyncio.run(scenario())


def test_engine_queue_then_timeout_releases_the_budget():
    async def scenario():
        c, clock, ledger, metrics = make(max_requests=1)
        first = await c.admit(account(c, "b"), shape())
        waiting = asyncio.ensure_future(c.admit(account(c, "a"), shape()))
        await asyncio.sleep(0)
        assert c.queue.depth == 1 and await ledger.inflight("a") == 1  # holds its unit while queued
        clock.advance(11)
        await c.tick()
        with pytest.raises(AdmissionError) as info:
            await waiting
        assert info.value.outcome is Outcome.EVICTED_QUEUE_TIMEOUT
        assert await ledger.inflight("a") == 0
        await first.release()
        assert 'medgemma_admission_total{outcome="evicted_queue_timeout"} 1.0' in text(metrics)
        assert "medgemma_queue_depth 0.0" in text(metrics)
    asyncio.run(scenario())


def test_client_leaving_the_engine_queue_releases_everything():
    async def scenario():
        c, _, ledger, metrics = make(max_requests=1)
        first = await c.admit(account(c, "b"), shape())
        waiting = asyncio.ensure_future(c.admit(account(c, "a"), shape()))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await ledger.inflight("a") == 0 and c.queue.depth == 0
        await first.release()
        assert c.queue.inflight_requests == 0
        assert 'outcome="evicted_client_gone"} 1.0' in text(metrics)
    asyncio.run(scenario())


def test_full_engine_queue_is_503_and_releases_the_budget():
    async def scenario():
        c, _, ledger, _ = make(max_requests=1, max_waiting=1)
        await c.admit(account(c, "b"), shape())
        asyncio.ensure_future(c.admit(account(c, "b"), shape()))
        await asyncio.sleep(0)
        with pytest.raises(AdmissionError) as info:
            await c.admit(account(c, "a"), shape())
        assert info.value.outcome is Outcome.REJECTED_QUEUE_FULL
        assert await ledger.inflight("a") == 0
    asyncio.run(scenario())


def test_retry_after_follows_the_completion_rate():
    assert retry_after_s(1, 0.0) == 15  # no data yet: a quarter of the cap
    assert retry_after_s(1, 10.0) == 1
    assert retry_after_s(10, 0.5) == 20
    assert retry_after_s(1000, 1.0) == 60

    async def scenario():
        c, clock, _, _ = make()
        a = account(c, "a")
        for _ in range(20):  # 20 completions in 10 s: 2 per second
            t = await c.admit(a, shape())
            clock.advance(0.5)
            await t.release()
        await c.admit(a, shape())
        await c.admit(a, shape())
        with pytest.raises(AdmissionError) as info:
            await c.admit(a, shape())
        assert info.value.retry_after_s == 1
    asyncio.run(scenario())


class SlowReleaseLedger(InProcessLedger):
    """Release takes a network round trip, like Redis."""

    synchronous = False

    async def release(self, lease):
        await asyncio.sleep(0.01)
        self.release_now(lease)


def test_release_completes_even_if_the_caller_is_cancelled():
    """Starlette cancels a finished stream's task while the ledger release is in flight."""

    async def scenario():
        c, _, _, _ = make()
        c.ledger = ledger = SlowReleaseLedger()
        ticket = await c.admit(account(c, "a"), shape())
        releasing = asyncio.ensure_future(ticket.release())
        await asyncio.sleep(0)
        releasing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await releasing
        await asyncio.sleep(0.05)
        assert ledger.total_inflight() == 0
        assert c.queue.inflight_requests == 0
    asyncio.run(scenario())


def test_admit_now_decides_without_suspending_when_everything_fits():
    async def scenario():
        c, _, ledger, metrics = make(max_requests=1)
        a = account(c, "a")
        ticket = c.admit_now(a, shape())
        assert ticket is not None and ticket.remaining == 1
        assert 'medgemma_admission_total{outcome="admitted"} 1.0' in text(metrics)
        # The engine is full: no decision now, and no lease is left behind.
        assert c.admit_now(a, shape()) is None
        assert ledger.total_inflight() == 1
        release = ticket.release()
        with pytest.raises(StopIteration):
            release.send(None)  # finishes in its first step: it never suspends
        assert ledger.total_inflight() == 0
        assert c.queue.inflight_requests == 0
    asyncio.run(scenario())


def test_admit_now_refuses_or_defers_like_admit():
    async def scenario():
        c, _, ledger, _ = make()
        a, w = account(c, "a"), account(c, "w")
        held = [c.admit_now(a, shape()), c.admit_now(a, shape())]
        with pytest.raises(AdmissionError) as info:  # no plan queue: 429 at once
            c.admit_now(a, shape())
        assert info.value.outcome is Outcome.REJECTED_OVER_BUDGET
        with pytest.raises(AdmissionError) as info:
            c.admit_now(a, shape(prompt=5000))
        assert info.value.outcome is Outcome.REJECTED_CONTEXT_LENGTH
        first = c.admit_now(w, shape())
        assert c.admit_now(w, shape()) is None  # its plan may wait: the slow path decides
        waiting = asyncio.ensure_future(c.admit(w, shape()))
        await asyncio.sleep(0)
        await first.release()  # an account with waiters releases through the slow path
        second = await asyncio.wait_for(waiting, 1)
        await second.release()
        for t in held:
            await t.release()
        assert ledger.total_inflight() == 0
    asyncio.run(scenario())


def test_admit_now_is_never_taken_with_a_round_trip_ledger():
    async def scenario():
        c, _, _, _ = make()
        c.ledger = SlowReleaseLedger()
        assert c.admit_now(account(c, "a"), shape()) is None
        ticket = await c.admit(account(c, "a"), shape())
        await ticket.release()
        assert c.ledger.total_inflight() == 0
    asyncio.run(scenario())


def test_demand_units_count_served_and_waiting_requests_for_autoscaling():
    async def scenario():
        c, _, _, _ = make(max_requests=2, max_waiting=4)
        b = account(c, "b")
        assert (c.demand_units(), c.capacity_units) == (0, 2)
        held = [await c.admit(b, shape()) for _ in range(2)]  # the engine's two slots
        waiting = [asyncio.ensure_future(c.admit(b, shape())) for _ in range(3)]
        await asyncio.sleep(0)
        assert c.demand_units() == 5  # 2 served + 3 queued for a slot
        await held[0].release()
        await asyncio.sleep(0)
        assert c.demand_units() == 4
        await held[1].release()
        for waiter in waiting:  # each gets the slot the previous one frees
            await (await waiter).release()
        assert c.demand_units() == 0
    asyncio.run(scenario())
