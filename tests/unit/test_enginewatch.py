"""EngineWatch: a dead or hung engine fails queued and running requests, then exits."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from serving.admission.clock import FakeClock
from serving.admission.controller import AdmissionController
from serving.admission.estimate import RequestShape
from serving.admission.keys import KeyStore
from serving.admission.ledger import InProcessLedger
from serving.admission.outcomes import AdmissionError, Outcome
from serving.admission.queue import Capacity, FairQueue
from serving.enginehealth import EngineHealth
from serving.enginewatch import EngineProgress, EngineWatch
from serving.metrics import ServingMetrics
from tests.unit.admission.ledgers import units_held


def controller_with_one_slot(health=None):
    clock = FakeClock()
    return AdmissionController(
        KeyStore.open(8), InProcessLedger(), FairQueue(Capacity(1, 10**6), 8, clock),
        ServingMetrics(CollectorRegistry()), max_model_len=1000, model_costs={"m": 1},
        queue_timeout_s=30, clock=clock, health=health,
    )  # fmt: skip


class FakeProgress:
    stuck = 0.0

    def stuck_s(self):
        return self.stuck


def watch_for(controller, health, events, progress=None):
    return EngineWatch(
        health=health, admission=controller, progress=progress or FakeProgress(), hang_timeout_s=10,
        interval_s=0.01, exit_delay_s=0.01, shutdown=lambda: events.append("shutdown"),
    )  # fmt: skip


@pytest.mark.parametrize("how", ["died", "hung"])
def test_a_failed_engine_evicts_the_queue_ends_running_requests_and_shuts_down(how):
    async def scenario():
        errored = [False]
        health = EngineHealth(lambda: errored[0])
        controller = controller_with_one_slot(health)
        account = controller.keys.accounts["anonymous"]
        shape = RequestShape("m", 10, 10)
        running = await controller.wait(account, shape)  # holds the only engine slot
        queued = asyncio.ensure_future(controller.wait(account, shape))
        await asyncio.sleep(0)
        assert controller.queue.depth == 1 and controller.running_count == 1
        events, progress = [], FakeProgress()
        watch = watch_for(controller, health, events, progress)
        task = asyncio.ensure_future(watch.run())
        await asyncio.sleep(0.05)
        assert events == [] and watch.check() is None and not health.failed  # healthy so far
        if how == "died":
            errored[0] = True
        else:
            progress.stuck = 11
        await asyncio.wait_for(task, 2)
        assert health.failed and health.failure == how and events == ["shutdown"]
        with pytest.raises(AdmissionError) as caught:
            await queued
        assert caught.value.outcome is Outcome.EVICTED_ENGINE_FAILED and controller.queue.depth == 0
        # the running request was ended by the watch, with the engine failure as its outcome
        assert running.ended and running.outcome is Outcome.EVICTED_ENGINE_FAILED
        assert controller.running_count == 0 and units_held(controller.ledger) == 0
        with pytest.raises(AdmissionError) as refused:  # new requests: 503 engine_unavailable
            controller.decide(account, shape)
        assert refused.value.outcome is Outcome.REJECTED_ENGINE_FAILED
        assert await running.end(Outcome.COMPLETED) is False  # its first end stands
        assert running.outcome is Outcome.EVICTED_ENGINE_FAILED
    asyncio.run(scenario())


def test_an_engine_stopped_on_purpose_is_not_a_failure():
    async def scenario():
        events, errored = [], [False]
        health = EngineHealth(lambda: errored[0])
        health.stop()  # vLLM's shutdown begins on a healthy engine ...
        errored[0] = True  # ... which then reports the stopped engine as errored
        watch = EngineWatch(health=health, admission=controller_with_one_slot(health), progress=FakeProgress(),
                            interval_s=0.01, shutdown=lambda: events.append("shutdown"))  # fmt: skip
        await asyncio.wait_for(watch.run(), 1)  # returns: nothing to watch any more
        assert not health.failed and health.failure is None and events == []
    asyncio.run(scenario())


def test_a_dead_engine_refuses_requests_before_the_watch_has_looked():
    # vLLM answers a request to a dead engine with a 500; between the death and the watch's
    # next look the controller reads the engine's flag itself (through EngineHealth).
    async def scenario():
        errored = [False]
        controller = controller_with_one_slot(EngineHealth(lambda: errored[0]))
        account, shape = controller.keys.accounts["anonymous"], RequestShape("m", 10, 10)
        await (await controller.wait(account, shape)).end(Outcome.COMPLETED)
        errored[0] = True
        with pytest.raises(AdmissionError) as refused:
            await controller.wait(account, shape)
        assert refused.value.outcome is Outcome.REJECTED_ENGINE_FAILED
        assert units_held(controller.ledger) == 0
    asyncio.run(scenario())


def test_engine_health_has_one_state_and_an_orderly_stop_is_no_failure(caplog):
    caplog.set_level("ERROR", logger="serving.enginehealth")
    errored = [False]
    health = EngineHealth(lambda: errored[0])
    assert not health.failed and health.failure is None
    health.stop()  # a clean shutdown: vLLM then reports the stopped engine as errored
    errored[0] = True
    assert health.stopping and not health.failed
    dead = EngineHealth(lambda: True)  # died before the shutdown began (vLLM's watchdog)
    dead.stop()
    assert dead.failed and dead.failure == "died"
    assert [r.getMessage() for r in caplog.records] == [
        "engine died: vLLM is stopping the server before the engine watch looked; exiting 1"
    ]  # the operator learns why it exits 1, once; an orderly stop logged nothing
    watched = EngineHealth(lambda: True)
    watched.declare_failed("hung")  # EngineWatch saw it first, and logged it
    watched.stop()
    assert watched.failure == "hung" and len(caplog.records) == 1
    hung = EngineHealth()
    hung.declare_failed("hung")
    hung.declare_failed("died")  # the first reason stands
    assert hung.failed and hung.failure == "hung"


class FakeEngineClient:
    """The two things EngineProgress reads of vLLM's AsyncLLM."""

    def __init__(self):
        self.unfinished = 0
        self.outputs: asyncio.Queue = asyncio.Queue()
        client = self

        class Core:
            async def get_output_async(self):
                return await client.outputs.get()

        class Processor:
            def get_num_unfinished_requests(self):
                return client.unfinished

        self.engine_core, self.output_processor = Core(), Processor()


def test_progress_is_the_engines_output_not_response_bytes():
    async def scenario():
        now = [100.0]
        engine = FakeEngineClient()
        progress = EngineProgress(engine, clock=lambda: now[0])
        assert progress.stuck_s() == 0.0  # idle: never stuck, however long since the last output
        now[0] += 1000
        engine.unfinished = 1  # a long non-streaming request: no response bytes until its end
        assert progress.stuck_s() == 0.0  # busy from now on
        for _ in range(5):  # ... but the engine keeps producing tokens for it
            now[0] += 30
            engine.outputs.put_nowait("outputs")
            assert await engine.engine_core.get_output_async() == "outputs"  # vLLM's call, wrapped
            assert progress.stuck_s() == 0.0
        now[0] += 30  # the engine stops producing (SIGSTOP): stuck counts from its last output
        assert progress.stuck_s() == 30.0
        engine.unfinished = 0
        assert progress.stuck_s() == 0.0
    asyncio.run(scenario())
