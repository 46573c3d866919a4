import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from serving.admission.clock import FakeClock
from serving.admission.controller import AdmissionController, RequestShape
from serving.admission.rates import retry_after_s
from serving.admission.keys import KeyStore
from serving.admission.ledger import InProcessLedger
from serving.admission.outcomes import AdmissionError, Outcome
from serving.admission.queue import Capacity, FairQueue
from serving.metrics import ServingMetrics
from tests.unit.admission.ledgers import units_held

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
        t1 = await c.wait(a, shape())
        t2 = await c.wait(a, shape())
        assert (t1.remaining, t2.remaining) == (1, 0)
        with pytest.raises(AdmissionError) as info:
            await c.wait(a, shape())
        assert info.value.outcome is Outcome.REJECTED_CONCURRENCY_LIMIT
        assert info.value.retry_after_s >= 1
        await t1.end(Outcome.COMPLETED)
        await t1.end(Outcome.COMPLETED)  # idempotent
        assert await ledger.inflight("a") == 1
        t3 = await c.wait(a, shape())
        await t2.end(Outcome.COMPLETED)
        await t3.end(Outcome.COMPLETED)
        assert units_held(ledger) == 0 and c.queue.inflight_requests == 0
        out = text(metrics)
        assert 'medgemma_admission_total{outcome="admitted",priority="interactive"} 3.0' in out
        assert 'medgemma_admission_total{outcome="rejected_concurrency_limit",priority="interactive"} 1.0' in out
        assert 'medgemma_inflight_units{plan="small"} 0.0' in out
        assert "medgemma_capacity_units 8.0" in out
    asyncio.run(scenario())


def test_model_cost_table():
    async def scenario():
        c, _, ledger, _ = make()
        b = account(c, "b")
        await c.wait(b, shape(model="big-model"))
        assert await ledger.inflight("b") == 4
        with pytest.raises(AdmissionError):
            await c.wait(account(c, "a"), shape(model="big-model"))  # 4 > 2
    asyncio.run(scenario())


def test_context_length_is_refused_before_anything_is_held():
    async def scenario():
        c, _, ledger, _ = make(max_model_len=1000)
        with pytest.raises(AdmissionError) as info:
            await c.wait(account(c, "a"), shape(prompt=600, max_tokens=500))
        assert info.value.outcome is Outcome.REJECTED_CONTEXT_LENGTH
        assert "1000" in info.value.message
        assert units_held(ledger) == 0
        with pytest.raises(AdmissionError):
            await c.wait(account(c, "a"), shape(prompt=1001, max_tokens=None))
        request = await c.wait(account(c, "a"), shape(prompt=600, max_tokens=None))
        assert request.slot.tokens == 1000  # no max_tokens: the rest of the context
    asyncio.run(scenario())


def test_draining_refuses_new_requests():
    async def scenario():
        c, _, _, _ = make()
        c.drain()
        with pytest.raises(AdmissionError) as info:
            await c.wait(account(c, "a"), shape())
        assert info.value.outcome is Outcome.REJECTED_DRAINING
    asyncio.run(scenario())


def test_plan_queue_waits_at_the_limit_then_gets_the_freed_unit():
    async def scenario():
        c, _, _, _ = make()
        w = account(c, "w")
        held = await c.wait(w, shape())
        waiting = asyncio.ensure_future(c.wait(w, shape()))
        await asyncio.sleep(0)
        assert not waiting.done()
        with pytest.raises(AdmissionError) as info:  # the plan queue holds one
            await c.wait(w, shape())
        assert info.value.outcome is Outcome.REJECTED_CONCURRENCY_LIMIT
        await held.end(Outcome.COMPLETED)
        request = await asyncio.wait_for(waiting, 1)
        assert request.inflight_after == 1
    asyncio.run(scenario())


def test_plan_queue_deadline_gives_429_without_sleeping():
    async def scenario():
        c, clock, ledger, _ = make()
        w = account(c, "w")
        await c.wait(w, shape())
        waiting = asyncio.ensure_future(c.wait(w, shape()))
        await asyncio.sleep(0)
        clock.advance(5.1)
        await c.tick()
        with pytest.raises(AdmissionError) as info:
            await waiting
        assert info.value.outcome is Outcome.REJECTED_CONCURRENCY_LIMIT
        assert "waited" in info.value.message
        assert await ledger.inflight("w") == 1
    asyncio.run(scenario())


def test_waiters_of_an_account_removed_by_a_key_reload_still_expire():
    async def scenario():
        c, clock, ledger, _ = make()
        w = account(c, "w")
        held = await c.wait(w, shape())
        waiting = asyncio.ensure_future(c.wait(w, shape()))
        await asyncio.sleep(0)
        assert c.has_waiters()
        c.keys = KeyStore.from_dict({**KEYS, "accounts": {"a": {"plan": "small"}}})  # "w" is gone
        clock.advance(2)
        await c.tick()
        assert not waiting.done()  # its deadline has not come
        clock.advance(3.1)
        await c.tick()
        with pytest.raises(AdmissionError) as info:
            await asyncio.wait_for(waiting, 1)
        assert info.value.outcome is Outcome.REJECTED_CONCURRENCY_LIMIT
        await asyncio.sleep(0)
        assert not c.has_waiters()  # the ticker may sleep again
        await held.end(Outcome.COMPLETED)
        assert units_held(ledger) == 0
    asyncio.run(scenario())


def test_a_waiter_of_a_removed_account_gets_the_unit_its_account_frees():
    async def scenario():
        c, _, _, _ = make()
        w = account(c, "w")
        held = await c.wait(w, shape())
        waiting = asyncio.ensure_future(c.wait(w, shape()))
        await asyncio.sleep(0)
        c.keys = KeyStore.from_dict({**KEYS, "accounts": {"a": {"plan": "small"}}})
        await held.end(Outcome.COMPLETED)
        request = await asyncio.wait_for(waiting, 1)
        await request.end(Outcome.COMPLETED)
        assert not c.has_waiters()
    asyncio.run(scenario())


def test_engine_queue_then_timeout_releases_the_budget():
    async def scenario():
        c, clock, ledger, metrics = make(max_requests=1)
        first = await c.wait(account(c, "b"), shape())
        waiting = asyncio.ensure_future(c.wait(account(c, "a"), shape()))
        await asyncio.sleep(0)
        assert c.queue.depth == 1 and await ledger.inflight("a") == 1  # holds its unit while queued
        clock.advance(11)
        await c.tick()
        with pytest.raises(AdmissionError) as info:
            await waiting
        assert info.value.outcome is Outcome.EVICTED_QUEUE_TIMEOUT
        assert await ledger.inflight("a") == 0
        await first.end(Outcome.COMPLETED)
        assert 'medgemma_admission_total{outcome="evicted_queue_timeout",priority="interactive"} 1.0' in text(metrics)
        assert "medgemma_queue_depth 0.0" in text(metrics)
    asyncio.run(scenario())


def test_client_leaving_the_engine_queue_releases_everything():
    async def scenario():
        c, _, ledger, metrics = make(max_requests=1)
        first = await c.wait(account(c, "b"), shape())
        waiting = asyncio.ensure_future(c.wait(account(c, "a"), shape()))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await ledger.inflight("a") == 0 and c.queue.depth == 0
        await first.end(Outcome.COMPLETED)
        assert c.queue.inflight_requests == 0
        assert 'outcome="evicted_client_gone",priority="interactive"} 1.0' in text(metrics)
    asyncio.run(scenario())


def test_full_engine_queue_is_503_and_releases_the_budget():
    async def scenario():
        c, _, ledger, _ = make(max_requests=1, max_waiting=1)
        await c.wait(account(c, "b"), shape())
        asyncio.ensure_future(c.wait(account(c, "b"), shape()))
        await asyncio.sleep(0)
        with pytest.raises(AdmissionError) as info:
            await c.wait(account(c, "a"), shape())
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
            t = await c.wait(a, shape())
            clock.advance(0.5)
            await t.end(Outcome.COMPLETED)
        await c.wait(a, shape())
        await c.wait(a, shape())
        with pytest.raises(AdmissionError) as info:
            await c.wait(a, shape())
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
        request = await c.wait(account(c, "a"), shape())
        releasing = asyncio.ensure_future(request.end(Outcome.COMPLETED))
        await asyncio.sleep(0)
        releasing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await releasing
        await asyncio.sleep(0.05)
        assert units_held(ledger) == 0
        assert c.queue.inflight_requests == 0
    asyncio.run(scenario())


def test_admit_now_decides_without_suspending_when_everything_fits():
    async def scenario():
        c, _, ledger, metrics = make(max_requests=1)
        a = account(c, "a")
        request = c.decide(a, shape())
        assert request is not None and request.remaining == 1
        assert 'medgemma_admission_total{outcome="admitted",priority="interactive"} 1.0' in text(metrics)
        # The engine is full: no decision now, and no lease is left behind.
        assert c.decide(a, shape()) is None
        assert units_held(ledger) == 1
        release = request.end(Outcome.COMPLETED)
        with pytest.raises(StopIteration):
            release.send(None)  # finishes in its first step: it never suspends
        assert units_held(ledger) == 0
        assert c.queue.inflight_requests == 0
    asyncio.run(scenario())


def test_admit_now_refuses_or_defers_like_admit():
    async def scenario():
        c, _, ledger, _ = make()
        a, w = account(c, "a"), account(c, "w")
        held = [c.decide(a, shape()), c.decide(a, shape())]
        with pytest.raises(AdmissionError) as info:  # no plan queue: 429 at once
            c.decide(a, shape())
        assert info.value.outcome is Outcome.REJECTED_CONCURRENCY_LIMIT
        with pytest.raises(AdmissionError) as info:
            c.decide(a, shape(prompt=5000))
        assert info.value.outcome is Outcome.REJECTED_CONTEXT_LENGTH
        first = c.decide(w, shape())
        assert c.decide(w, shape()) is None  # its plan may wait: the slow path decides
        waiting = asyncio.ensure_future(c.wait(w, shape()))
        await asyncio.sleep(0)
        await first.end(Outcome.COMPLETED)  # an account with waiters releases through the slow path
        second = await asyncio.wait_for(waiting, 1)
        await second.end(Outcome.COMPLETED)
        for t in held:
            await t.end(Outcome.COMPLETED)
        assert units_held(ledger) == 0
    asyncio.run(scenario())


def test_admit_now_is_never_taken_with_a_round_trip_ledger():
    async def scenario():
        c, _, _, _ = make()
        c.ledger = SlowReleaseLedger()
        assert c.decide(account(c, "a"), shape()) is None
        request = await c.wait(account(c, "a"), shape())
        await request.end(Outcome.COMPLETED)
        assert units_held(c.ledger) == 0
    asyncio.run(scenario())


def test_demand_units_count_served_and_waiting_requests_for_autoscaling():
    async def scenario():
        c, _, _, _ = make(max_requests=2, max_waiting=4)
        b = account(c, "b")
        assert (c.demand_units(), c.capacity_units) == (0, 2)
        held = [await c.wait(b, shape()) for _ in range(2)]  # the engine's two slots
        waiting = [asyncio.ensure_future(c.wait(b, shape())) for _ in range(3)]
        await asyncio.sleep(0)
        assert c.demand_units() == 5  # 2 served + 3 queued for a slot
        await held[0].end(Outcome.COMPLETED)
        await asyncio.sleep(0)
        assert c.demand_units() == 4
        await held[1].end(Outcome.COMPLETED)
        for waiter in waiting:  # each gets the slot the previous one frees
            await (await waiter).end(Outcome.COMPLETED)
        assert c.demand_units() == 0
    asyncio.run(scenario())


def test_batch_demand_never_scales_unless_told_and_each_class_has_its_queue_deadline():
    from serving.admission.priority import PriorityClass

    async def scenario(scale_on_batch):
        clock = FakeClock()
        c = AdmissionController(
            KeyStore.from_dict(KEYS), InProcessLedger(), FairQueue(Capacity(1, 100_000), 4, clock),
            ServingMetrics(CollectorRegistry()), max_model_len=4096, model_costs={"medgemma-4b-it": 1},
            queue_timeout_s=10, batch_queue_timeout_s=300, scale_on_batch=scale_on_batch, clock=clock,
        )  # fmt: skip
        b = account(c, "b")
        batch = RequestShape("medgemma-4b-it", 10, 10, priority=PriorityClass.BATCH)
        running = c.decide(b, batch)
        waiting = asyncio.ensure_future(c.wait(b, batch))
        interactive = asyncio.ensure_future(c.wait(b, shape()))
        await asyncio.sleep(0)
        demand = c.demand_units()
        clock.advance(11)  # past interactive's deadline, far from batch's
        await c.tick()
        with pytest.raises(AdmissionError) as info:
            await asyncio.wait_for(interactive, 1)
        assert info.value.outcome is Outcome.EVICTED_QUEUE_TIMEOUT and not waiting.done()
        await running.end(Outcome.COMPLETED)
        await (await asyncio.wait_for(waiting, 1)).end(Outcome.COMPLETED)
        return demand

    assert asyncio.run(scenario(False)) == 1  # the waiting interactive request; batch is idle-capacity work
    assert asyncio.run(scenario(True)) == 3
