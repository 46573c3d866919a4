"""Reloads the keys file without a restart: on SIGHUP, and when the file changes.

Guarantees:
- A reload that loads swaps the controller's key store in one assignment: the next request
  authenticates against the new keys and plans; requests in flight keep their units.
- A malformed or unreadable file of any shape keeps the old keys, and says why in a
  warning (the message never contains a key: the file holds only hashes) and in
  ``medgemma_keys_reloads_total{result="error"}``; the watch keeps running and the next
  good file is picked up. Nothing a file holds can stop the reloads.
- The file is polled by (mtime, size, inode), so an editor's atomic replace is seen too.
- Every change a reload brings (keys added, removed, revoked, restored, given another
  expiry; accounts suspended, resumed, moved to another plan) becomes a ``key_change``
  record for the audit trail (``audit``: the usage log), however the file was edited.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from serving.admission.keyaudit import store_changes
from serving.admission.keys import KeysFileError, KeyStore

logger = logging.getLogger(__name__)


class KeyReloader:
    def __init__(self, path: str | os.PathLike, controller, metrics, audit=None, replica: str | None = None):
        self.path = Path(path)
        self.controller = controller
        self.metrics = metrics
        self.audit = audit  # takes each key_change record (the usage log's emit)
        self.replica = replica
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
        old, self.controller.keys = self.controller.keys, keys
        self.metrics.keys_reloads_total.labels(result="ok").inc()
        changes = self._changes(old, keys)
        logger.info("keys file reloaded (%s): %d accounts, %d keys, %d changes", reason, len(keys.accounts),
                    len(keys.key_hashes), len(changes))  # fmt: skip
        return True

    def _changes(self, old: KeyStore, new: KeyStore) -> list[dict]:
        """The reload's key_change records, handed to ``audit``; never fails the reload."""
        if old is None:
            return []
        try:
            extra = {"replica": self.replica} if self.replica else {}
            changes = store_changes(old, new, "reload", **extra)
            for record in changes if self.audit is not None else ():
                self.audit(record)
            return changes
        except Exception:  # noqa: BLE001 - the new keys are in force; the audit must not undo that
            logger.exception("keys file reload: could not record its changes")
            return []

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
