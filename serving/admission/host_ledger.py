"""A budget ledger shared by the API processes of one host, in a file in shared memory.

Several API processes serve one engine (``--api-processes``); an account's budget must be
exact across them without an external service. The parent (the launcher) creates one
``HostLedgerFile``; each API process opens it with its own slot number and uses a
``HostLedger``: exact, synchronous (the controller's fast path stays), no I/O but two
``flock`` calls on a file in ``/dev/shm``.

Guarantees:
- The check and the grant are one step under an exclusive ``flock`` on the file, so two
  processes can never both take an account's last unit.
- Each row is an account (a 64-bit hash of its name) and one column per API process: a
  process only ever writes its own column. The units an account holds are the column sum.
- Nothing depends on process ids (every container's server is commonly pid 1): the parent
  hands out slots. A process that dies leaves units only in its own column:
  ``HostLedgerFile.clear_slot`` (the parent, when a child dies) and a new ``HostLedger`` on
  the same slot zero it. ``flock`` is released by the kernel when its holder dies.
- When every row is taken (more accounts than ``rows``), a new account's request is
  refused with ``LedgerUnavailable``, never granted without a count.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from serving.admission.ledger import Grant, Lease, LedgerUnavailable, new_lease_id

DEFAULT_ROWS = 65536  # accounts per host: 65536 x (1 + slots) x 8 bytes (2.6 MB for 4 processes)
MAGIC = 0x4D4547484C454447  # "MEGHLEDG"
HEADER = 3  # int64 words: magic, slots, rows


def account_key(account: str) -> int:
    """A non-zero signed 64-bit key for an account name (zero marks an empty row)."""
    key = int.from_bytes(hashlib.blake2b(account.encode(), digest_size=8).digest(), "little", signed=True)
    return key or 1


class HostLedgerFile:
    """The shared table: its path, and what only the parent does with it (create, clear a
    dead process's column, remove)."""

    def __init__(self, path: Path, slots: int, rows: int):
        self.path, self.slots, self.rows = path, slots, rows

    @classmethod
    def create(cls, slots: int, rows: int = DEFAULT_ROWS, directory: str | None = None) -> HostLedgerFile:
        """A zeroed table for ``slots`` processes, in ``/dev/shm`` where it exists."""
        if slots < 1 or rows < 1:
            raise ValueError(f"a host ledger needs at least one slot and one row, not {slots} and {rows}")
        if directory is None and os.path.isdir("/dev/shm"):
            directory = "/dev/shm"
        fd, name = tempfile.mkstemp(prefix="medgemma-ledger-", dir=directory)
        try:
            os.ftruncate(fd, 8 * (HEADER + rows * (1 + slots)))
            with mmap.mmap(fd, 0) as memory:
                words = memory_words(memory)
                words[0], words[1], words[2] = MAGIC, slots, rows
                words.release()
        finally:
            os.close(fd)
        return cls(Path(name), slots, rows)

    def clear_slot(self, slot: int) -> None:
        """Zero one process's column (it died: its requests ended with it)."""
        with HostTable(self.path) as table:
            table.clear_slot(slot)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def memory_words(memory: mmap.mmap) -> memoryview:
    return memoryview(memory).cast("q")


class HostTable:
    """One process's open view of the table, and the operations on it under its lock."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDWR)
        try:
            self._memory = mmap.mmap(self._fd, 0)
        except BaseException:
            os.close(self._fd)
            raise
        self._words = memory_words(self._memory)
        if self._words[0] != MAGIC:
            self.close()
            raise LedgerUnavailable(f"{path} is not a host ledger")
        self.slots, self.rows = self._words[1], self._words[2]
        self._width = 1 + self.slots

    def __enter__(self) -> HostTable:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._words.release()
        self._memory.close()
        os.close(self._fd)

    @contextmanager
    def locked(self):
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def row(self, key: int, insert: bool) -> int | None:
        """The word offset of the account's row (probing linearly); None when it has none and
        ``insert`` is false, or the table is full. Call under the lock."""
        words, width = self._words, self._width
        start = key % self.rows
        for step in range(self.rows):
            offset = HEADER + ((start + step) % self.rows) * width
            found = words[offset]
            if found == key:
                return offset
            if found == 0:
                if not insert:
                    return None
                words[offset] = key
                return offset
        return None

    def held(self, offset: int) -> int:
        return sum(self._words[offset + 1 : offset + self._width])

    def add(self, offset: int, slot: int, units: int) -> None:
        self._words[offset + 1 + slot] += units

    def clear_slot(self, slot: int) -> None:
        with self.locked():
            for row in range(self.rows):
                self._words[HEADER + row * self._width + 1 + slot] = 0


class HostLedger:
    """Exact budgets across the API processes of one host (see the module's guarantees)."""

    synchronous = True

    def __init__(self, path: Path, slot: int):
        self._table = HostTable(path)
        if not 0 <= slot < self._table.slots:
            self._table.close()
            raise ValueError(f"slot {slot} is outside the host ledger's {self._table.slots} slots")
        self.slot = slot
        self._leases: dict[str, Lease] = {}
        self._table.clear_slot(slot)  # whatever a previous process in this slot left

    def acquire_now(self, account: str, units: int, budget: int) -> Grant:
        table = self._table
        with table.locked():
            offset = table.row(account_key(account), insert=True)
            if offset is None:
                raise LedgerUnavailable(f"the host ledger is full ({table.rows} accounts)")
            used = table.held(offset)
            if used + units > budget:
                return Grant(None, used)
            table.add(offset, self.slot, units)
        lease = Lease(new_lease_id(), account, units)
        self._leases[lease.lease_id] = lease
        return Grant(lease, used + units)

    def release_now(self, lease: Lease) -> bool:
        if self._leases.pop(lease.lease_id, None) is None:
            return False
        table = self._table
        with table.locked():
            offset = table.row(account_key(lease.account), insert=False)
            if offset is not None:
                table.add(offset, self.slot, -lease.units)
        return True

    async def acquire(self, account: str, units: int, budget: int) -> Grant:
        return self.acquire_now(account, units, budget)

    async def release(self, lease: Lease) -> None:
        self.release_now(lease)

    async def inflight(self, account: str) -> int:
        table = self._table
        with table.locked():
            offset = table.row(account_key(account), insert=False)
            return 0 if offset is None else table.held(offset)

    def close(self) -> None:
        self._table.close()
