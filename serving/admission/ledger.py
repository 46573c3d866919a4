"""Budget ledgers: who holds how many concurrency units right now.

Guarantees (both implementations):
- ``acquire`` grants a lease only if the account's in-flight units plus the request's
  cost stay within the budget; the check and the grant are one atomic step.
- ``release`` is idempotent: releasing a lease twice, or a lease that expired, is a no-op.
- Every grant returns the account's in-flight units after the decision, for the
  ``x-ratelimit-remaining-concurrency`` header.

``InProcessLedger`` is exact within one process. ``serving.admission.redis_ledger`` shares
budgets across replicas.
"""

from __future__ import annotations

import itertools
import os
import secrets
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Lease:
    lease_id: str
    account: str
    units: int


@dataclass(frozen=True)
class Grant:
    """The result of an acquire: a lease (None when refused) and the account's in-flight units."""

    lease: Lease | None
    inflight: int


class LedgerUnavailable(Exception):
    """The shared ledger cannot be reached and the policy is to refuse."""


class BudgetLedger(Protocol):
    async def acquire(self, account: str, units: int, budget: int) -> Grant: ...

    async def release(self, lease: Lease) -> None: ...

    async def inflight(self, account: str) -> int: ...

    synchronous: bool
    """True when ``acquire_now``/``release_now`` decide without I/O (the admission fast path)."""


_ids = itertools.count()
_prefix = ""


def _new_prefix() -> None:
    """128 random bits per process: the process id is no identity (every container's
    server is commonly pid 1), and a forked child must not reuse its parent's ids."""
    global _prefix, _ids
    _prefix = secrets.token_hex(16)
    _ids = itertools.count()


_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)


def new_lease_id() -> str:
    """A lease id unique across processes, pods and restarts (random prefix + counter)."""
    return f"{_prefix}-{next(_ids):x}"


class SynchronousLedger:
    """A ledger that decides without I/O: ``acquire``/``release`` are ``acquire_now``/
    ``release_now`` (the admission fast path calls those directly)."""

    synchronous = True

    def acquire_now(self, account: str, units: int, budget: int) -> Grant:
        raise NotImplementedError

    def release_now(self, lease: Lease) -> bool:
        raise NotImplementedError

    async def acquire(self, account: str, units: int, budget: int) -> Grant:
        return self.acquire_now(account, units, budget)

    async def release(self, lease: Lease) -> None:
        self.release_now(lease)


class InProcessLedger(SynchronousLedger):
    """Exact budgets within one process (the default, and the fallback of the Redis ledger)."""

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}
        self._leases: dict[str, Lease] = {}

    def acquire_now(self, account: str, units: int, budget: int) -> Grant:
        used = self._inflight.get(account, 0)
        if used + units > budget:
            return Grant(None, used)
        lease = Lease(new_lease_id(), account, units)
        self._leases[lease.lease_id] = lease
        self._inflight[account] = used + units
        return Grant(lease, used + units)

    def release_now(self, lease: Lease) -> bool:
        if self._leases.pop(lease.lease_id, None) is None:
            return False
        left = self._inflight[lease.account] - lease.units
        if left:
            self._inflight[lease.account] = left
        else:
            del self._inflight[lease.account]
        return True

    def units_of(self, account: str) -> int:
        return self._inflight.get(account, 0)

    async def inflight(self, account: str) -> int:
        return self.units_of(account)

    def take_all(self) -> list[Lease]:
        """Hand every live lease over to another ledger and forget them here."""
        leases = list(self._leases.values())
        self._leases.clear()
        self._inflight.clear()
        return leases
