"""Usage records out of the event loop: JSON lines to a size-rotated file, or to stdout.

Guarantees:
- ``UsageLog.emit`` never blocks and never raises: it puts the record on an in-memory queue
  (one ``SimpleQueue.put``); one writer thread serialises and writes. A record that cannot
  be kept is dropped and counted (``medgemma_usage_records_dropped_total{reason}``):
  ``queue_full`` when more than ``max_pending`` wait (the disk is slower than the traffic),
  ``write_error`` when the write fails (a full disk, a vanished folder); a request never
  fails because of its record. ``medgemma_usage_records_written_total`` counts the rest.
- A failed write leaves no partial line behind (the file is cut back to its last whole
  record where the OS allows), and the writer retries the file with the next records.
- Rotation by size, as ``logging.handlers.RotatingFileHandler`` does: ``usage.jsonl`` ->
  ``usage.jsonl.1`` -> ... -> ``usage.jsonl.<backups>`` (the oldest is deleted); each line
  is one whole record. ``backups`` x ``max_bytes`` bounds the disk it uses (retention).
- ``close`` writes what is queued (up to its timeout); it runs at interpreter exit too, and
  ``close_all`` runs it for an exit that skips that (a failed Ray replica's ``os._exit``).
- One writer per file: two processes must not share one path (each server its own file,
  or stdout).
"""

from __future__ import annotations

import atexit
import json
import weakref
import logging
import os
import queue
import threading
import time
from pathlib import Path

from serving.admission.keyaudit import utc_iso  # the records' one time format

logger = logging.getLogger(__name__)

STDOUT = "-"
BATCH = 512  # records written per write call at most
_STOP = object()
_OPEN: weakref.WeakSet = weakref.WeakSet()  # every log not closed yet


def close_all(timeout_s: float = 2.0) -> None:
    """Write what every open log holds: for an exit that skips ``atexit`` (``os._exit``)."""
    for log in list(_OPEN):
        log.close(timeout_s)


def encode(record: dict) -> bytes:
    """One record as one line; a float ``time`` becomes its UTC ISO text."""
    if isinstance(record.get("time"), float):
        record = {**record, "time": utc_iso(record["time"])}
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class UsageLog:
    def __init__(self, target: str | os.PathLike, metrics, *, max_bytes: int = 100 * 2**20,
                 backups: int = 10, max_pending: int = 10_000):  # fmt: skip
        self.target = str(target)
        self.path = None if self.target == STDOUT else Path(self.target)
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.backups = backups
        self.max_pending = max_pending
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._file = None
        self._size = 0
        self._warned_at = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)
        _OPEN.add(self)

    # --- the event loop's side ------------------------------------------------------------
    def emit(self, record: dict) -> None:
        if self._closed or self._pending.qsize() >= self.max_pending:
            self.metrics.usage_records_dropped.labels(reason="queue_full").inc()
            return
        self._pending.put(record)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._pending.put(_STOP)
        self._thread.join(timeout_s)
        atexit.unregister(self.close)
        _OPEN.discard(self)

    # --- the writer thread -------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._pending.get()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _STOP or _STOP in batch:
                stopping = True
                batch = [r for r in batch if r is not _STOP]
            if batch:
                self._write_batch(batch)
        if self._file is not None:
            self._file.close()

    def _write_batch(self, batch: list[dict]) -> None:
        try:
            lines = [encode(record) for record in batch]
        except (TypeError, ValueError):  # a bug in a record: drop the batch, keep writing
            logger.exception("usage records could not be encoded")
            self.metrics.usage_records_dropped.labels(reason="write_error").inc(len(batch))
            return
        written = 0
        try:
            for chunk in self._chunks(lines):
                self._write(b"".join(chunk))
                written += len(chunk)
        except OSError as exc:
            self.metrics.usage_records_written.inc(written)
            self.metrics.usage_records_dropped.labels(reason="write_error").inc(len(batch) - written)
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                logger.warning("usage records dropped: cannot write %s (%s)", self.target, exc.strerror or exc)
            return
        self.metrics.usage_records_written.inc(len(batch))

    def _chunks(self, lines: list[bytes]):
        """The lines in runs that each fit the current file (stdout: one run)."""
        if self.path is None:
            yield lines
            return
        run, size = [], self._size
        for line in lines:
            if run and size + len(line) > self.max_bytes:
                yield run
                run, size = [], self._size
            run.append(line)
            size += len(line)
        if run:
            yield run

    def _write(self, data: bytes) -> None:
        if self.path is None:
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]
            return
        if self._file is not None and self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held open across batches
            self._size = self._file.seek(0, os.SEEK_END)
        start = self._size
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view):]
        except OSError:
            self._cut_back(start)
            raise
        self._size = start + len(data)

    def _cut_back(self, size: int) -> None:
        """After a failed write: no partial line stays; the file is reopened next time."""
        try:
            self._file.truncate(size)
        except OSError:
            pass
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None

    def _rotate(self) -> None:
        self._file.close()
        self._file = None
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
