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
  hands out slots. A process that dies leaves units only in its own column, and a new
  ``HostLedger`` on the same slot zeroes it (today an API process's death ends the whole
  server, and its file with it). ``flock`` is released by the kernel when its holder dies.
- A row whose units add up to zero may be given to another account, so the table only
  fills when more than ``rows`` accounts hold units at once; then a new account's request
  is refused with ``LedgerUnavailable``, never granted without a count.
- The file does not outlive its server: the creator holds an exclusive ``flock`` on an
  owner file beside it for its lifetime, and ``create`` removes tables whose creator is
  gone (a killed server, in a ``/dev/shm`` that survives container restarts).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from serving.admission.ledger import Grant, Lease, LedgerUnavailable, SynchronousLedger, new_lease_id

DEFAULT_ROWS = 65536  # accounts per host: 65536 x (1 + slots) x 8 bytes (2.6 MB for 4 processes)
MAGIC = 0x4D4547484C454447  # "MEGHLEDG"
HEADER = 3  # int64 words: magic, slots, rows


def account_key(account: str) -> int:
    """A non-zero signed 64-bit key for an account name (zero marks an empty row)."""
    key = int.from_bytes(hashlib.blake2b(account.encode(), digest_size=8).digest(), "little", signed=True)
    return key or 1


PREFIX = "medgemma-ledger-"
OWNER = ".owner"  # beside each table: its creator holds an exclusive flock on it while it lives


class HostLedgerFile:
    """The shared table as its creator (the parent) holds it: create, remove."""

    def __init__(self, path: Path, slots: int, rows: int, owner_fd: int | None):
        self.path, self.slots, self.rows = path, slots, rows
        self._owner_fd = owner_fd

    @classmethod
    def create(cls, slots: int, rows: int = DEFAULT_ROWS, directory: str | None = None) -> HostLedgerFile:
        """A zeroed table for ``slots`` processes, in ``/dev/shm`` where it exists; tables
        left by creators that are gone are removed first."""
        if slots < 1 or rows < 1:
            raise ValueError(f"a host ledger needs at least one slot and one row, not {slots} and {rows}")
        if directory is None and os.path.isdir("/dev/shm"):
            directory = "/dev/shm"
        remove_abandoned(directory or tempfile.gettempdir())
        # the owner file is locked before its name can be seen, and the table is made after
        owner_fd, locking = tempfile.mkstemp(prefix=PREFIX, suffix=".tmp", dir=directory)
        fcntl.flock(owner_fd, fcntl.LOCK_EX)  # "in use", until this process ends or removes it
        name = locking.removesuffix(".tmp")
        os.rename(locking, name + OWNER)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except BaseException:
            cls(Path(name), slots, rows, owner_fd).remove()
            raise
        try:
            os.ftruncate(fd, 8 * (HEADER + rows * (1 + slots)))
            with mmap.mmap(fd, 0) as memory:
                words = memory_words(memory)
                words[0], words[1], words[2] = MAGIC, slots, rows
                words.release()
        except BaseException:
            cls(Path(name), slots, rows, owner_fd).remove()
            raise
        finally:
            os.close(fd)
        return cls(Path(name), slots, rows, owner_fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        Path(str(self.path) + OWNER).unlink(missing_ok=True)
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None


def remove_abandoned(directory: str) -> list[Path]:
    """Remove the tables in ``directory`` whose creator no longer holds their owner lock
    (a killed server), and tables without an owner file; returns them."""
    removed = []
    for path in Path(directory).glob(PREFIX + "*"):
        if path.name.endswith(".tmp"):
            continue  # an owner file being made
        table = Path(str(path).removesuffix(OWNER))
        if not path.name.endswith(OWNER):
            if Path(str(path) + OWNER).exists():
                continue  # judged by its owner file
        else:
            try:
                owner = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its creator is alive
            finally:
                os.close(owner)
        HostLedgerFile(table, 0, 0, None).remove()
        removed.append(table)
    return removed


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
        ``insert`` is false, or the table is full. With ``insert``, a new account takes the
        first row on its probe path that holds no units, else the empty row that ends it.
        Rows never become empty again, so no probe path is ever cut. Call under the lock."""
        words, width = self._words, self._width
        start = key % self.rows
        reusable = None
        for step in range(self.rows):
            offset = HEADER + ((start + step) % self.rows) * width
            found = words[offset]
            if found == key:
                return offset
            if found == 0:
                break
            if insert and reusable is None and self.held(offset) == 0:
                reusable = offset
        else:
            offset = None  # every row taken, and none is this account's
        if not insert:
            return None
        offset = reusable if reusable is not None else offset
        if offset is not None:
            for column in range(1, width):  # no column is below zero, so all are zero; made sure
                words[offset + column] = 0
            words[offset] = key
        return offset

    def held(self, offset: int) -> int:
        return sum(self._words[offset + 1 : offset + self._width])

    def add(self, offset: int, slot: int, units: int) -> None:
        self._words[offset + 1 + slot] += units

    def clear_slot(self, slot: int) -> None:
        with self.locked():
            for row in range(self.rows):
                self._words[HEADER + row * self._width + 1 + slot] = 0


class HostLedger(SynchronousLedger):
    """Exact budgets across the API processes of one host (see the module's guarantees)."""

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

    async def inflight(self, account: str) -> int:
        table = self._table
        with table.locked():
            offset = table.row(account_key(account), insert=False)
            return 0 if offset is None else table.held(offset)

    def close(self) -> None:
        self._table.close()
