"""Watches the vLLM engine; when it dies or hangs, fails fast and exits non-zero.

A hang is measured from the engine's own progress (``EngineProgress``): the engine has
requests and has handed this process no output for ``hang_timeout_s``. Response bytes are
no measure: a non-streaming request sends nothing until it ends, however long it runs.

Guarantees, from the moment the engine is seen failed (vLLM reports it errored, or it has
requests and has produced nothing for ``hang_timeout_s``):
- ``/ready`` and ``/health`` answer 503 (vLLM's own checks for a dead engine; ours for a hung
  one), new model requests get 503 ``engine_unavailable`` with Retry-After, and queued
  requests are evicted with the same error - none is dropped silently.
- Requests still running are ended at once by the admission middleware (an SSE error
  event with code ``engine_unavailable`` then ``[DONE]`` for a stream, a 503 for a request
  that has sent nothing yet); their units are released. A dead engine sends nothing more,
  so there is nothing to wait for.
- The process then lingers ``exit_delay_s`` (1 s: the error events reach their clients,
  probes see the 503s), shuts down and exits 1, so the orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable

from serving.admission.outcomes import Outcome

logger = logging.getLogger(__name__)


class EngineProgress:
    """When vLLM's engine last handed this process any output, and for how long it has had
    requests without doing so.

    It wraps the engine client's ``get_output_async`` (the one call through which every
    engine output reaches vLLM's output handler) on the instance; vLLM's files are not
    touched. Unfinished requests are the output processor's own count."""

    def __init__(self, engine_client, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.last_output_at = clock()
        self._busy_since: float | None = None
        self._unfinished = engine_client.output_processor.get_num_unfinished_requests
        core = engine_client.engine_core
        receive = core.get_output_async

        async def get_output_async():
            outputs = await receive()
            self.last_output_at = self.clock()
            return outputs

        core.get_output_async = get_output_async

    def stuck_s(self, now: float | None = None) -> float:
        """Seconds the engine has had requests and produced nothing; 0 while it has none."""
        now = self.clock() if now is None else now
        if not self._unfinished():
            self._busy_since = None
            return 0.0
        if self._busy_since is None:
            self._busy_since = now
        return now - max(self.last_output_at, self._busy_since)


class EngineWatch:
    def __init__(
        self,
        *,
        errored: Callable[[], bool],
        controller,
        middleware,
        progress,
        on_failed: Callable[[], None],
        stopping: Callable[[], bool] = lambda: False,
        hang_timeout_s: float = 120.0,
        interval_s: float = 0.5,
        exit_delay_s: float = 1.0,
        shutdown: Callable[[], None] | None = None,
    ):
        self.errored = errored
        self.controller = controller
        self.middleware = middleware
        self.progress = progress  # EngineProgress: stuck_s()
        self.on_failed = on_failed
        self.stopping = stopping  # an orderly shutdown has begun: the engine stops on purpose
        self.hang_timeout_s = hang_timeout_s
        self.exit_delay_s = exit_delay_s
        self.interval_s = interval_s
        self.shutdown = shutdown or (lambda: os.kill(os.getpid(), signal.SIGINT))
        self.failed: str | None = None

    def check(self) -> str | None:
        """Why the engine is failed ("died"/"hung"), or None while it is healthy (or is
        being shut down on purpose)."""
        if self.stopping():
            return None
        if self.errored():
            return "died"
        if self.progress.stuck_s() > self.hang_timeout_s:
            return "hung"
        return None

    async def run(self) -> None:
        while self.failed is None:
            await asyncio.sleep(self.interval_s)
            if self.stopping():
                return
            self.failed = self.check()
        await self.fail(self.failed)

    async def fail(self, why: str) -> None:
        self.on_failed()
        evicted = self.controller.fail_engine()
        logger.error(
            "engine %s: refusing new requests, %d queued requests evicted, %d running; exiting",
            why,
            evicted,
            self.middleware.serving_count,
        )
        await self.middleware.end_all(
            "The model engine failed while this request ran; retry it.", Outcome.EVICTED_ENGINE_FAILED
        )
        await asyncio.sleep(self.exit_delay_s)
        self.shutdown()
