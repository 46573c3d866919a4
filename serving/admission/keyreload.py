"""Reloads the keys file without a restart: on SIGHUP, and when the file changes.

Guarantees:
- A reload that loads swaps the controller's key store in one assignment: the next request
  authenticates against the new keys and plans; requests in flight keep their units.
- A malformed or unreadable file of any shape keeps the old keys, and says why in a
  warning (the message never contains a key: the file holds only hashes) and in
  ``medgemma_keys_reloads_total{result="error"}``; the watch keeps running and the next
  good file is picked up. Nothing a file holds can stop the reloads.
- The file is polled by (mtime, size, inode), so an editor's atomic replace is seen too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from serving.admission.keys import KeysFileError, KeyStore

logger = logging.getLogger(__name__)


class KeyReloader:
    def __init__(self, path: str | os.PathLike, controller, metrics):
        self.path = Path(path)
        self.controller = controller
        self.metrics = metrics
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, reason: str = "SIGHUP") -> bool:
        self._seen = self._stamp()
        try:
            keys = KeyStore.load(self.path)
        except KeysFileError as exc:
            self.metrics.keys_reloads_total.labels(result="error").inc()
            logger.warning("keys file reload (%s) failed; keeping the previous keys: %s", reason, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a bug must not end the reloads either
            self.metrics.keys_reloads_total.labels(result="error").inc()
            logger.error("keys file reload (%s) failed unexpectedly (%s); keeping the previous keys",
                         reason, type(exc).__name__)  # fmt: skip
            return False
        self.controller.keys = keys
        self.metrics.keys_reloads_total.labels(result="ok").inc()
        logger.info(
            "keys file reloaded (%s): %d accounts, %d keys", reason, len(keys.accounts), len(keys.key_hashes)
        )
        return True

    def check(self) -> bool:
        """Reload if the file changed since the last look; True if it reloaded."""
        if self._stamp() != self._seen:
            return self.reload("file changed")
        return False

    async def watch(self, interval_s: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.check()

    def install(
        self, loop: asyncio.AbstractEventLoop, signal_number: int, interval_s: float = 2.0
    ) -> asyncio.Task:
        """The file watch, and the signal where this loop can take one (only a main-thread
        loop can: a Ray Serve replica's cannot, and relies on the watch alone)."""
        try:
            loop.add_signal_handler(signal_number, self.reload)
        except (ValueError, RuntimeError):
            logger.info("keys file: reloads on change only (no %s handler off the main thread)",
                        signal.Signals(signal_number).name)  # fmt: skip
        return loop.create_task(self.watch(interval_s))
