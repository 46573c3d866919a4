"""Image preprocessing in priority-class order, so a STAT image never waits behind batch ones.

vLLM 0.32 runs every request's multimodal preprocessing (Gemma 3's image processor: decode,
resize to 896x896, normalise; 40-150 ms of CPU per image) on one worker thread of the API
process, first come first served (``BaseRenderer._mm_executor``). Under a batch flood that
queue holds several batch images, and a STAT request's image waited for all of them: on the
2-core dev machine its TTFT p95 doubled (docs/admission.md, "Priority classes").

``ClassOrderedExecutor`` replaces that worker: still one thread (vLLM requires it: the
processor and its cache are not thread-safe), but the next job is the most urgent class's,
first come first served within a class. The class comes from ``preprocess_rank``, a context
variable the admission middleware sets before it hands a request to vLLM; work submitted
outside a request (warm-up, cache resets) counts as interactive.

Guarantees: the replacement waits for whatever the old worker still runs (vLLM's background
warm-up) before it starts, so the two never run at once; a job whose caller gave up (the
client left) is skipped; an exception reaches the caller; a shutdown lets queued jobs run
(unless told to cancel them) and refuses new ones; if this vLLM's renderer does not have the
attributes we replace, nothing is replaced and a warning says so (the server then runs
with vLLM's own order). Strict order has no ageing: a batch image waits while more urgent
images keep coming (its request keeps its engine slot meanwhile), as batch waits for
engine slots; a preprocessing worker saturated by STAT and interactive images is an
overloaded server either way.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import queue
import threading
from concurrent.futures import Executor, Future

from serving.admission.priority import PriorityClass

logger = logging.getLogger(__name__)

preprocess_rank: contextvars.ContextVar[int] = contextvars.ContextVar(
    "preprocess_rank", default=PriorityClass.INTERACTIVE.rank
)
_LAST = len(PriorityClass)  # the shutdown marker's rank: after every job already queued


class ClassOrderedExecutor(Executor):
    """One worker thread; the job of the most urgent class waiting runs next."""

    def __init__(self, before=None, name: str = "mm-preprocess-by-class"):
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._before = before  # run once in the worker before any job
        self._lock = threading.Lock()  # a submit and a shutdown never interleave
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._jobs.put((preprocess_rank.get(), next(self._seq), future, fn, args, kwargs))
        return future

    def pending(self) -> int:
        return self._jobs.qsize()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; what is queued still runs unless ``cancel_futures``."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if cancel_futures:
                self._cancel_queued()
            self._jobs.put((_LAST, next(self._seq), None, None, (), {}))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _work(self) -> None:
        if self._before is not None:
            try:
                self._before()
            except Exception:  # the old worker's failure is not ours to raise
                logger.exception("waiting for vLLM's preprocessing worker failed")
        while True:
            _, _, future, fn, args, kwargs = self._jobs.get()
            if future is None:  # the shutdown marker: nothing can be queued after it
                return
            if future.set_running_or_notify_cancel():  # else its caller gave up (client gone)
                run_into(future, fn, args, kwargs)

    def _cancel_queued(self) -> None:
        while not self._jobs.empty():
            future = self._jobs.get_nowait()[2]
            if future is not None:
                future.cancel()


def run_into(future: Future, fn, args: tuple, kwargs: dict) -> None:
    """``fn(*args, **kwargs)`` here, its result or exception set on ``future`` (running)."""
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - handed to the caller, as a pool would
        future.set_exception(exc)
    else:
        future.set_result(result)


def order_preprocessing_by_class(engine_client) -> ClassOrderedExecutor | None:
    """Swap vLLM's single preprocessing worker for a class-ordered one; None when this vLLM's
    renderer is not the shape we know (then vLLM keeps its own order)."""
    from vllm.utils.async_utils import make_async

    renderer = getattr(engine_client, "renderer", None)
    names = ("_mm_executor", "_process_multimodal", "clear_mm_cache", "_process_multimodal_async",
             "_clear_mm_cache_async")  # fmt: skip
    if renderer is None or not all(hasattr(renderer, name) for name in names):
        logger.warning("image preprocessing stays first come first served: this vLLM's renderer has no %s",
                       "/".join(names))  # fmt: skip
        return None
    old = renderer._mm_executor

    def drain_old() -> None:
        """Let the old worker finish what it holds (vLLM's warm-up), then retire it."""
        old.submit(lambda: None).result()
        old.shutdown(wait=False)

    executor = ClassOrderedExecutor(before=drain_old)
    renderer._mm_executor = executor
    renderer._process_multimodal_async = make_async(renderer._process_multimodal, executor=executor)
    renderer._clear_mm_cache_async = make_async(renderer.clear_mm_cache, executor=executor)
    resources = getattr(renderer, "_resources", None)
    if resources is not None:
        resources.callback(executor.shutdown, wait=False)
    logger.info("image preprocessing runs in priority-class order (stat first), one worker")
    return executor
