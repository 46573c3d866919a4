"""The engine's health: one state, read through ``EngineHealth.failed``.

Guarantees:
- ``failed`` is True from the first moment the engine is known to be unusable: vLLM reports
  it errored (it died), or ``declare_failed`` was called (``EngineWatch`` saw it die or hang).
  Every reader (admission, ``/ready``, ``/health``, the Ray health check, the exit status)
  asks this one property; nobody keeps a copy.
- An orderly stop (``stop()``: vLLM's shutdown after a drain or SIGINT) is no failure, even
  though vLLM reports a stopped engine as errored; an engine that had already failed when
  the stop began stays failed, so the process still exits 1.
- ``failure`` says why ("died" or "hung"), None while healthy.
- A failure is logged once, as "engine died"/"engine hung": by ``EngineWatch``, or here
  when vLLM's own watchdog stops the server before the watch has looked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


class EngineHealth:
    def __init__(self, errored: Callable[[], bool] = lambda: False):
        self._errored = errored  # vLLM's ``engine_client.errored``
        self._failure: str | None = None
        self.stopping = False  # an orderly stop has begun: the engine stops on purpose

    def watch_errored(self, errored: Callable[[], bool]) -> None:
        """Read vLLM's own flag (``engine_client.errored``) once the engine exists."""
        self._errored = errored

    @property
    def failed(self) -> bool:
        """The engine died or hung (and this was no orderly stop)."""
        if self._failure is not None:
            return True
        return not self.stopping and self._errored()

    @property
    def failure(self) -> str | None:
        """Why the engine failed ("died", "hung"), or None while it is healthy."""
        if self._failure is None and self.failed:
            return "died"
        return self._failure

    def declare_failed(self, why: str) -> None:
        """The engine died or hung (``EngineWatch``); the first reason stands."""
        if self._failure is None:
            self._failure = why

    def stop(self) -> None:
        """vLLM's shutdown is stopping the engine on purpose. One that had already failed
        when the stop began did fail: vLLM's own watchdog may stop the server before
        ``EngineWatch`` looks, and the process must still exit 1."""
        if not self.stopping and self._failure is None and self._errored():
            self.declare_failed("died")
            logger.error("engine died: vLLM is stopping the server before the engine watch looked; exiting 1")
        self.stopping = True
