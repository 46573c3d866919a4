"""Image preprocessing in class order: one worker, the most urgent class's job next."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.admission.preprocess import (
    ClassOrderedExecutor,
    order_preprocessing_by_class,
    preprocess_rank,
)
from serving.admission.priority import PriorityClass

STAT, INTERACTIVE, BATCH = (c.rank for c in (PriorityClass.STAT, PriorityClass.INTERACTIVE, PriorityClass.BATCH))


def submit_as(executor, rank: int, fn, *args):
    """Submit from a context whose request class is ``rank``, as the middleware sets it."""
    def inner():
        preprocess_rank.set(rank)
        return executor.submit(fn, *args)

    return contextvars.copy_context().run(inner)


def busy_worker(executor) -> tuple[threading.Event, object]:
    """Occupy the worker with a batch job until the returned gate is set."""
    started, gate = threading.Event(), threading.Event()

    def job():
        started.set()
        gate.wait()
        return "busy done"

    future = submit_as(executor, BATCH, job)
    assert started.wait(5)
    return gate, future


def test_a_stat_job_runs_before_the_batch_jobs_queued_ahead_of_it():
    executor = ClassOrderedExecutor()
    ran: list[str] = []
    gate, busy = busy_worker(executor)  # the worker is busy with a batch image
    jobs = [submit_as(executor, BATCH, ran.append, f"batch{i}") for i in range(3)]
    jobs.append(submit_as(executor, INTERACTIVE, ran.append, "interactive"))
    jobs.append(submit_as(executor, STAT, ran.append, "stat"))
    jobs.append(submit_as(executor, BATCH, ran.append, "batch3"))
    gate.set()
    assert busy.result(timeout=5) == "busy done"  # the running job is not interrupted
    for job in jobs:
        job.result(timeout=5)
    # then by class, first come first served within one
    assert ran == ["stat", "interactive", "batch0", "batch1", "batch2", "batch3"]
    executor.shutdown()


def test_one_job_at_a_time_on_one_thread():
    executor = ClassOrderedExecutor()
    threads, active, overlaps = set(), [0], []
    lock = threading.Lock()

    def job():
        with lock:
            active[0] += 1
            overlaps.append(active[0])
        threads.add(threading.get_ident())
        threading.Event().wait(0.002)
        with lock:
            active[0] -= 1

    for future in [submit_as(executor, rank % 3, job) for rank in range(30)]:
        future.result(timeout=5)
    assert max(overlaps) == 1 and len(threads) == 1
    executor.shutdown()


def test_errors_reach_the_caller_and_a_cancelled_job_never_runs():
    executor = ClassOrderedExecutor()
    ran: list[str] = []
    gate, _ = busy_worker(executor)
    cancelled = submit_as(executor, STAT, ran.append, "gone")
    failing = submit_as(executor, BATCH, lambda: 1 / 0)
    assert cancelled.cancel()  # the client left before its image's turn
    gate.set()
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)
    assert ran == []
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(print)


def test_the_class_set_in_a_request_task_orders_vllms_own_async_wrapper():
    """Each request task sets its class (as the middleware does); vLLM's ``make_async``
    wrapper, called from inside the task, submits in that task's context."""
    from vllm.utils.async_utils import make_async

    executor = ClassOrderedExecutor()
    ran: list[str] = []
    process = make_async(lambda name: ran.append(name) or name.upper(), executor=executor)

    async def request(rank: int, name: str) -> str:
        preprocess_rank.set(rank)
        await asyncio.sleep(0)
        return await process(name)

    async def scenario():
        gate, _ = busy_worker(executor)
        tasks = [asyncio.ensure_future(request(rank, name))
                 for rank, name in ((BATCH, "b1"), (BATCH, "b2"), (INTERACTIVE, "i"), (STAT, "s"))]  # fmt: skip
        while executor.pending() < 4:
            await asyncio.sleep(0.001)
        gate.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(scenario()) == ["B1", "B2", "I", "S"]
    assert ran == ["s", "i", "b1", "b2"]
    executor.shutdown()


def test_shutdown_lets_queued_jobs_finish_and_refuses_new_ones():
    executor = ClassOrderedExecutor()
    gate, _ = busy_worker(executor)
    queued = submit_as(executor, BATCH, lambda: "ran")
    threading.Timer(0.05, gate.set).start()
    executor.shutdown(wait=True)
    assert queued.result(timeout=1) == "ran"
    with pytest.raises(RuntimeError):
        executor.submit(print)


def test_the_swap_waits_for_the_old_workers_warmup_and_rewires_vllms_wrappers():
    """On a stand-in with the attributes of vLLM 0.32's renderer (the real one is swapped in
    every server the integration tests start)."""
    old = ThreadPoolExecutor(max_workers=1)
    warmup_done = threading.Event()
    order: list[str] = []

    def warmup():
        threading.Event().wait(0.05)
        order.append("warmup")
        warmup_done.set()

    class Renderer:
        _mm_executor = old

        def _process_multimodal(self, value):
            order.append(f"process {value}")
            return value

        def clear_mm_cache(self):
            order.append("clear")

        _process_multimodal_async = _clear_mm_cache_async = None

    class Engine:
        renderer = Renderer()

    old.submit(warmup)
    executor = order_preprocessing_by_class(Engine())
    assert isinstance(executor, ClassOrderedExecutor) and Engine.renderer._mm_executor is executor

    async def scenario():
        return await Engine.renderer._process_multimodal_async(7), await Engine.renderer._clear_mm_cache_async()

    assert asyncio.run(scenario()) == (7, None)
    assert order == ["warmup", "process 7", "clear"]  # never at the same time as the old worker's job
    executor.shutdown()


def test_an_unknown_renderer_is_left_alone():
    class Engine:
        renderer = object()

    assert order_preprocessing_by_class(Engine()) is None
