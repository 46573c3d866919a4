"""Graceful drain on SIGTERM.

Guarantees, from the moment SIGTERM arrives (once the server is up):
- ``/ready`` answers 503 ``draining`` at once (the load balancer stops sending), and new
  model requests get 503 ``draining`` with ``Retry-After``.
- Requests already admitted - streaming, or queued for an engine slot - run to their end.
- When none is left, or when ``grace_s`` has passed, vLLM's own shutdown runs and the
  process exits 0. At the end of the grace period the requests still running are ended
  (``AdmissionController.end_running`` with ``evicted_drained``: an SSE ``error`` event for
  a stream, a 503 ``draining`` body if nothing was sent yet) and their units are released.
- It talks to admission only through its public surface: ``drain``, ``busy``, ``end_running``.
A second SIGTERM during the drain is ignored (Kubernetes sends one; a human may send more);
SIGINT stays vLLM's immediate shutdown.
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

POLL_S = 0.1
DRAINED_MESSAGE = "The server shut down before this request finished; retry it."


class Drainer:
    def __init__(
        self,
        *,
        grace_s: float,
        admission,
        shutdown: Callable[[], None] | None = None,
    ):
        self.grace_s = grace_s
        self.admission = admission  # AdmissionController: drain, busy, end_running
        self.shutdown = shutdown or (lambda: os.kill(os.getpid(), signal.SIGINT))
        self.started_at: float | None = None
        self.task: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take SIGTERM over from vLLM's handler (call after vLLM installed its own)."""
        loop.add_signal_handler(signal.SIGTERM, self.begin)

    def begin(self) -> None:
        if self.started_at is not None:
            logger.info("drain: already draining (%d requests left)", self.admission.busy())
            return
        self.started_at = time.monotonic()
        self.admission.drain()
        logger.info(
            "drain: SIGTERM - /ready is 503, new requests are refused; %d admitted requests "
            "may finish within %.0fs",
            self.admission.busy(),
            self.grace_s,
        )
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        deadline = self.started_at + self.grace_s
        while self.admission.busy() and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        left = self.admission.busy()
        if left:
            logger.warning("drain: grace period of %.0fs over; ending %d requests", self.grace_s, left)
            await self.admission.end_running(Outcome.EVICTED_DRAINED, DRAINED_MESSAGE)
        logger.info("drain: done in %.1fs; shutting down", time.monotonic() - self.started_at)
        self.shutdown()
