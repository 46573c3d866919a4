"""The engine gate with priority classes: reservation, strict priority, per-class queues."""

import asyncio

import pytest

from serving.admission.clock import FakeClock
from serving.admission.outcomes import AdmissionError, Outcome
from serving.admission.priority import PriorityClass
from serving.admission.queue import Capacity, ClassShares, FairQueue

STAT, INTERACTIVE, BATCH = PriorityClass.STAT, PriorityClass.INTERACTIVE, PriorityClass.BATCH


def make(slots=10, max_requests=10, max_waiting=4, clock=None, shares=ClassShares(interactive=0.9, batch=0.5)):
    return FairQueue(Capacity(max_requests, 10**9), max_waiting, clock or FakeClock(), shares=shares,
                     engine_slots=slots)  # fmt: skip


def fill(q, priority, account="x"):
    """Take slots of ``priority`` until it can take no more; returns them."""
    slots = []
    while (slot := q.try_acquire(account, 1, priority)) is not None:
        slots.append(slot)
    return slots


def test_batch_holds_at_most_its_share_interactive_at_most_its_and_stat_the_rest():
    q = make()
    assert q.class_limits == {STAT: 10, INTERACTIVE: 9, BATCH: 5}
    assert len(fill(q, BATCH)) == 5  # half the engine's slots
    assert len(fill(q, INTERACTIVE)) == 4  # interactive and batch together: 9
    assert len(fill(q, STAT)) == 1  # the slot only stat may use
    assert q.inflight_requests == 10


def test_a_stat_request_never_finds_the_engine_full_of_lower_classes():
    q = make()
    fill(q, BATCH)
    fill(q, INTERACTIVE)
    assert q.try_acquire("batch-account", 1, BATCH) is None
    assert q.try_acquire("clinician", 1, STAT) is not None


def test_lower_classes_soak_up_idle_capacity_up_to_their_share_and_yield_as_they_end():
    async def scenario():
        q = make(max_waiting=10)
        held = fill(q, BATCH)
        waiting_batch = q.enqueue("b", 1, 60, BATCH)  # batch is at its share: it waits
        assert q.inflight_of(BATCH) == 5 and q.depth_of(BATCH) == 1
        interactive = q.try_acquire("i", 1, INTERACTIVE)  # the idle slots are free for the others
        assert interactive is not None
        q.release(held[0])  # a batch request ends: the next batch request takes its place
        assert (await asyncio.wait_for(q.wait(waiting_batch), 1)).priority is BATCH
        assert q.inflight_of(BATCH) == 5

    asyncio.run(scenario())


def test_strict_priority_a_freed_slot_goes_to_the_most_urgent_class_waiting():
    async def scenario():
        q = make(slots=2, max_requests=2, shares=ClassShares())  # no reservation: order alone
        held = [q.try_acquire("x", 1, BATCH), q.try_acquire("x", 1, BATCH)]
        batch = q.enqueue("b", 1, 60, BATCH)
        interactive = q.enqueue("i", 1, 60, INTERACTIVE)
        stat = q.enqueue("s", 1, 60, STAT)  # the last to arrive
        q.release(held[0])
        assert stat.future.done() and not interactive.future.done() and not batch.future.done()
        q.release(held[1])
        assert interactive.future.done() and not batch.future.done()
        q.release((await q.wait(stat)))
        assert batch.future.done()

    asyncio.run(scenario())


def test_nothing_less_urgent_overtakes_a_waiting_request_even_one_that_would_fit():
    async def scenario():
        q = FairQueue(Capacity(10, 100), 4, FakeClock(), shares=ClassShares(), engine_slots=10)
        q.try_acquire("x", 50, INTERACTIVE)
        stat = q.enqueue("s", 80, 60, STAT)  # 50 + 80 tokens > 100: it must wait
        assert not stat.future.done()
        assert q.try_acquire("b", 10, BATCH) is None  # 50 + 10 would fit, but stat waits
        assert q.try_acquire("i", 10, INTERACTIVE) is None

    asyncio.run(scenario())


def test_a_class_at_its_share_yields_the_next_free_slot_to_a_more_urgent_class():
    async def scenario():
        q = make(max_waiting=10)
        held = fill(q, BATCH)
        fill(q, INTERACTIVE)  # interactive and batch now hold their 9 slots
        batch = q.enqueue("b", 1, 60, BATCH)
        interactive = q.enqueue("i", 1, 60, INTERACTIVE)
        q.release(held[0])  # a batch request ends
        assert interactive.future.done() and not batch.future.done()
        assert q.inflight_of(BATCH) == 4 and q.inflight_of(INTERACTIVE) == 5

    asyncio.run(scenario())


def test_each_class_has_its_own_bounded_queue_so_a_batch_flood_never_refuses_stat():
    async def scenario():
        q = make(slots=1, max_requests=1, max_waiting=2, shares=ClassShares())
        q.try_acquire("x", 1, BATCH)
        for _ in range(2):
            q.enqueue("b", 1, 60, BATCH)
        with pytest.raises(AdmissionError) as info:
            q.enqueue("b", 1, 60, BATCH)
        assert info.value.outcome is Outcome.REJECTED_QUEUE_FULL
        q.enqueue("s", 1, 60, STAT)  # its own queue has room
        assert q.depth == 3 and q.depth_of(STAT) == 1

    asyncio.run(scenario())


def test_deadlines_are_per_request_and_evict_by_class():
    async def scenario():
        clock = FakeClock()
        q = make(slots=1, max_requests=1, clock=clock, shares=ClassShares())
        q.try_acquire("x", 1, INTERACTIVE)
        batch = q.enqueue("b", 1, 300, BATCH)
        interactive = q.enqueue("i", 1, 30, INTERACTIVE)
        clock.advance(31)
        assert q.expire() == 1
        with pytest.raises(AdmissionError) as info:
            await q.wait(interactive)
        assert info.value.outcome is Outcome.EVICTED_QUEUE_TIMEOUT
        assert not batch.future.done() and q.depth_of(BATCH) == 1

    asyncio.run(scenario())


def test_within_a_class_the_least_served_account_goes_first():
    async def scenario():
        q = make(slots=1, max_requests=1, shares=ClassShares())
        first = q.try_acquire("heavy", 100, BATCH)
        heavy = q.enqueue("heavy", 1, 60, BATCH)
        light = q.enqueue("light", 1, 60, BATCH)
        q.release(first)
        assert light.future.done() and not heavy.future.done()

    asyncio.run(scenario())


def test_a_tiny_engine_still_lets_every_class_run_and_shares_of_one_reserve_nothing():
    q = make(slots=1, max_requests=3)
    assert q.class_limits == {STAT: 3, INTERACTIVE: 1, BATCH: 1}  # at least one slot each
    assert make(shares=ClassShares()).class_limits == {STAT: 10, INTERACTIVE: 10, BATCH: 10}
    assert make(shares=ClassShares(interactive=0.3, batch=0.8)).class_limits[BATCH] == 3  # within interactive's


def test_when_a_waiting_stat_request_leaves_the_less_urgent_ones_behind_it_run_at_once():
    """Found by the property test in a fresh-clone run: strict priority held an interactive
    request behind a STAT one that then left, until some other release."""

    async def scenario():
        q = FairQueue(Capacity(5, 300), 3, FakeClock(), shares=ClassShares(), engine_slots=5)
        q.try_acquire("b", 148, STAT)
        stat = q.enqueue("b", 153, 60, STAT)  # 148 + 153 > 300: waits
        interactive = q.enqueue("a", 2, 60, INTERACTIVE)  # fits, but a more urgent one waits
        assert not interactive.future.done()
        q.remove(stat)  # the clinician's client left
        assert interactive.future.done() and q.depth == 0

    asyncio.run(scenario())


def test_batch_holds_at_most_its_share_of_the_kv_cache_too():
    """Long batch requests fill the KV cache before they fill the slots: the shares bound
    estimated KV tokens as well, so a STAT request finds room in the cache."""
    q = FairQueue(Capacity(20, 1000), 4, FakeClock(), shares=ClassShares(interactive=0.9, batch=0.5),
                  engine_slots=16)  # fmt: skip
    assert q.class_token_limits == {STAT: 1000, INTERACTIVE: 900, BATCH: 500}
    assert q.try_acquire("b", 300, BATCH) is not None
    assert q.try_acquire("b", 200, BATCH) is not None  # 500: exactly its share
    assert q.try_acquire("b", 1, BATCH) is None  # a slot is free, the cache share is not
    assert q.tokens_of(BATCH) == 500 and q.inflight_of(BATCH) == 2
    assert q.try_acquire("i", 400, INTERACTIVE) is not None  # interactive and batch: 900
    assert q.try_acquire("i", 1, INTERACTIVE) is None
    assert q.try_acquire("s", 100, STAT) is not None  # the last tenth is STAT's


def test_one_batch_request_larger_than_its_kv_share_runs_alone_in_its_class():
    async def scenario():
        q = FairQueue(Capacity(20, 1000), 4, FakeClock(), shares=ClassShares(interactive=0.9, batch=0.5),
                      engine_slots=16)  # fmt: skip
        big = q.try_acquire("b", 700, BATCH)  # over the share, but batch holds nothing: it runs
        assert big is not None
        second = q.enqueue("b", 10, 60, BATCH)  # nothing more of batch while it runs
        assert not second.future.done()
        assert q.try_acquire("s", 300, STAT) is not None  # and STAT still fits beside it
        q.release(big)
        assert (await asyncio.wait_for(q.wait(second), 1)).tokens == 10

    asyncio.run(scenario())
