"""AdmittedRequest: one owner of a request's units, one idempotent end, explicit states."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from serving.admission.clock import FakeClock
from serving.admission.controller import AdmissionController
from serving.admission.estimate import RequestShape
from serving.admission.keys import KeyStore
from serving.admission.ledger import InProcessLedger
from serving.admission.outcomes import Outcome
from serving.admission.queue import Capacity, FairQueue
from serving.admission.request import FORCED_ENDS, RequestState
from serving.metrics import ServingMetrics
from tests.unit.admission.ledgers import units_held


def make(abort=None):
    clock = FakeClock()
    controller = AdmissionController(
        KeyStore.open(8), InProcessLedger(), FairQueue(Capacity(4, 10**6), 4, clock),
        ServingMetrics(CollectorRegistry()), max_model_len=1000, model_costs={"m": 1},
        queue_timeout_s=30, clock=clock, abort=abort,
    )  # fmt: skip
    return controller, controller.keys.accounts["anonymous"], RequestShape("m", 10, 10)


def test_states_are_explicit_from_admission_to_the_end():
    async def scenario():
        controller, account, shape = make()
        request = controller.decide(account, shape)
        assert request.state is RequestState.ADMITTED and request.lease is not None and request.slot is not None
        request.response_started(200, streaming=True)
        assert request.state is RequestState.STREAMING
        assert await request.end(Outcome.COMPLETED) is True
        assert request.state is RequestState.ENDED and request.ended and request.outcome is Outcome.COMPLETED
        assert request.lease is None and units_held(controller.ledger) == 0 and controller.running_count == 0

    asyncio.run(scenario())


def test_a_waiting_request_holds_its_units_and_is_admitted_when_its_slot_comes():
    async def scenario():
        controller, account, shape = make()
        held = [controller.decide(account, shape) for _ in range(4)]  # the engine's four slots
        waiting = asyncio.ensure_future(controller.wait(account, RequestShape("m", 10, 10)))
        await asyncio.sleep(0)
        assert controller.queue.depth == 1 and not waiting.done()
        assert controller.busy() == 5 and controller.demand_units() == 5 and units_held(controller.ledger) == 5
        await held[0].end(Outcome.COMPLETED)
        request = await asyncio.wait_for(waiting, 1)
        assert request.state is RequestState.ADMITTED
        for r in (*held[1:], request):
            await r.end(Outcome.COMPLETED)
        assert units_held(controller.ledger) == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("first", [Outcome.COMPLETED, Outcome.EVICTED_CLIENT_GONE, *sorted(FORCED_ENDS)])
def test_the_first_end_stands_and_every_later_one_is_a_no_op(first):
    async def scenario():
        controller, account, shape = make()
        request = controller.decide(account, shape)
        results = await asyncio.gather(request.end(first), request.end(Outcome.COMPLETED),
                                       request.end(Outcome.EVICTED_DRAINED))  # fmt: skip
        assert results == [True, False, False] and request.outcome is first
        assert units_held(controller.ledger) == 0 and controller.queue.inflight_requests == 0
        assert controller.metrics.registry.get_sample_value("medgemma_inflight_units", {"plan": "open"}) == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("outcome", [Outcome.EVICTED_CLIENT_STALLED, Outcome.EVICTED_DRAINED])
def test_a_forced_end_cancels_the_app_and_aborts_the_engine_before_the_units_are_free(outcome):
    async def scenario():
        seen_at_abort = []

        async def abort(ids):
            seen_at_abort.append((ids, units_held(controller.ledger)))

        controller, account, shape = make(abort)
        request = controller.decide(account, shape)
        app = asyncio.ensure_future(asyncio.sleep(60))
        request.serve(app, ["chatcmpl-x"])
        await request.end(outcome, "why")
        assert seen_at_abort == [(["chatcmpl-x"], 1)]  # the unit was still held while vLLM let go
        await asyncio.sleep(0)
        assert app.cancelled() and request.forced_end and request.end_message == "why"
        assert units_held(controller.ledger) == 0

    asyncio.run(scenario())


def test_a_failed_engine_is_not_asked_to_abort():
    async def scenario():
        aborted = []

        async def abort(ids):
            aborted.append(ids)

        controller, account, shape = make(abort)
        request = controller.decide(account, shape)
        app = asyncio.ensure_future(asyncio.sleep(60))
        request.serve(app, ["chatcmpl-x"])
        await request.end(Outcome.EVICTED_ENGINE_FAILED, "engine failed")
        await asyncio.sleep(0)
        assert aborted == [] and app.cancelled() and units_held(controller.ledger) == 0

    asyncio.run(scenario())


def test_end_running_ends_every_running_request_once():
    async def scenario():
        controller, account, shape = make()
        requests = [controller.decide(account, shape) for _ in range(3)]
        await requests[0].end(Outcome.COMPLETED)
        await controller.end_running(Outcome.EVICTED_DRAINED, "draining")
        assert [r.outcome for r in requests] == [Outcome.COMPLETED, Outcome.EVICTED_DRAINED, Outcome.EVICTED_DRAINED]
        assert controller.running_count == 0 and controller.busy() == 0 and units_held(controller.ledger) == 0

    asyncio.run(scenario())


def test_the_forced_ends_are_exactly_the_three_the_server_imposes():
    from serving.admission.request import _forces

    assert {o for o in Outcome if _forces(o)} == FORCED_ENDS == {
        Outcome.EVICTED_CLIENT_STALLED, Outcome.EVICTED_DRAINED, Outcome.EVICTED_ENGINE_FAILED}


def test_a_second_end_waits_for_a_forced_end_in_flight_even_if_the_first_caller_is_cancelled():
    async def scenario():
        gate = asyncio.Event()

        async def abort(ids):
            await gate.wait()  # the engine takes its time to let go

        controller, account, shape = make(abort)
        request = controller.decide(account, shape)
        request.serve(asyncio.ensure_future(asyncio.sleep(60)), ["chatcmpl-x"])
        first = asyncio.ensure_future(request.end(Outcome.EVICTED_DRAINED, "draining"))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(request.end(Outcome.COMPLETED))
        await asyncio.sleep(0)
        assert not second.done() and units_held(controller.ledger) == 1  # held until vLLM let go
        first.cancel()  # the drainer's task is cancelled: the end still completes
        gate.set()
        assert await asyncio.wait_for(second, 1) is False
        assert request.outcome is Outcome.EVICTED_DRAINED and request.released
        assert units_held(controller.ledger) == 0 and controller.running_count == 0

    asyncio.run(scenario())
