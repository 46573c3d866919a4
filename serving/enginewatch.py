"""Watches the vLLM engine; when it dies or hangs, fails fast and exits non-zero.

Guarantees, from the moment the engine is seen failed (vLLM reports it errored, or
requests are running and none has produced a byte for ``hang_timeout_s``):
- ``/ready`` and ``/health`` answer 503 (vLLM's own checks for a dead engine; ours for a hung
  one), new model requests get 503 ``engine_unavailable`` with Retry-After, and queued
  requests are evicted with the same error - none is dropped silently.
- Requests still running get ``grace_s`` to receive vLLM's own error, then are ended by the
  admission middleware (an SSE error event with code ``engine_unavailable`` for a stream);
  their units are released.
- The process then shuts down and exits 1, so the orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from serving.admission.outcomes import Outcome

logger = logging.getLogger(__name__)


class EngineWatch:
    def __init__(
        self,
        *,
        errored: Callable[[], bool],
        controller,
        middleware,
        on_failed: Callable[[], None],
        stopping: Callable[[], bool] = lambda: False,
        hang_timeout_s: float = 120.0,
        grace_s: float = 2.0,
        interval_s: float = 0.5,
        shutdown: Callable[[], None] | None = None,
    ):
        self.errored = errored
        self.controller = controller
        self.middleware = middleware
        self.on_failed = on_failed
        self.stopping = stopping  # an orderly shutdown has begun: the engine stops on purpose
        self.hang_timeout_s = hang_timeout_s
        self.grace_s = grace_s
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
        if self.middleware.stuck_s() > self.hang_timeout_s:
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
        deadline = asyncio.get_running_loop().time() + self.grace_s
        while self.middleware.serving_count and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await self.middleware.end_all(
            "The model engine failed while this request ran; retry it.", Outcome.EVICTED_ENGINE_FAILED
        )
        self.shutdown()
