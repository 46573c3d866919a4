"""Watches the vLLM engine; when it dies or hangs, fails fast and exits non-zero.

A hang is measured from the engine's own progress (``EngineProgress``): the engine has
requests and has handed this process no output for ``hang_timeout_s``. Response bytes are
no measure: a non-streaming request sends nothing until it ends, however long it runs.

Guarantees, from the moment the engine is seen failed (vLLM reports it errored, or it has
requests and has produced nothing for ``hang_timeout_s``):
- ``/ready`` and ``/health`` answer 503 (vLLM's own checks for a dead engine; ours for a hung
  one), new model requests get 503 ``engine_unavailable`` with Retry-After, and queued
  requests are evicted with the same error - none is dropped silently.
- Requests still running are ended at once (``AdmissionController.end_running`` with
  ``evicted_engine_failed``: an SSE error event with code ``engine_unavailable`` then
  ``[DONE]`` for a stream, a 503 for a request that has sent nothing yet); their units
  are released. A dead engine sends nothing more,
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
from serving.enginehealth import EngineHealth

logger = logging.getLogger(__name__)

FAILED_MESSAGE = "The model engine failed while this request ran; retry it."


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
    """Looks at the engine every ``interval_s``; on a failure it tells admission
    (``fail_engine``, ``end_running``: its public surface) and shuts the process down."""

    def __init__(
        self,
        *,
        health: EngineHealth,
        admission,
        progress,
        hang_timeout_s: float = 120.0,
        interval_s: float = 0.5,
        exit_delay_s: float = 1.0,
        shutdown: Callable[[], None] | None = None,
    ):
        self.health = health
        self.admission = admission  # AdmissionController
        self.progress = progress  # EngineProgress: stuck_s()
        self.hang_timeout_s = hang_timeout_s
        self.exit_delay_s = exit_delay_s
        self.interval_s = interval_s
        self.shutdown = shutdown or (lambda: os.kill(os.getpid(), signal.SIGINT))

    def check(self) -> str | None:
        """Why the engine is failed ("died"/"hung"), or None while it is healthy (or is
        being stopped on purpose)."""
        if self.health.stopping:
            return None
        if self.health.failed:
            return self.health.failure
        if self.progress.stuck_s() > self.hang_timeout_s:
            return "hung"
        return None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self.health.stopping:
                return
            why = self.check()
            if why is not None:
                await self.fail(why)
                return

    async def fail(self, why: str) -> None:
        evicted = self.admission.fail_engine(why)
        logger.error(
            "engine %s: refusing new requests, %d queued requests evicted, %d running; exiting",
            why,
            evicted,
            self.admission.running_count,
        )
        await self.admission.end_running(Outcome.EVICTED_ENGINE_FAILED, FAILED_MESSAGE)
        await asyncio.sleep(self.exit_delay_s)
        self.shutdown()
