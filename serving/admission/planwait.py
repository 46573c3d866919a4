"""Requests waiting for their plan's budget (a plan with ``queue:`` waits instead of a 429).

Guarantees:
- Per account, at most the plan's ``max_waiting`` wait, FIFO; each until its deadline (the
  plan's ``timeout_s``), then it gets the 429 it would have got at once.
- Units freed on this replica go to the account's first waiter at once (``wake``); units
  freed on other replicas are found by the ticker's retries (``retry``).
- A waiter keeps the account as it arrived: a key reload that removes the account does not
  strand it, it still expires by its own deadline.
- A grant that lands as its client leaves is released, never leaked.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from serving.admission.keys import Account
from serving.admission.ledger import BudgetLedger, Grant
from serving.admission.outcomes import AdmissionError
from serving.admission.priority import PriorityClass
from serving.admission.queue import granted


@dataclass
class _PlanWaiter:
    account: Account  # as it was on arrival: a key reload that removes it does not strand the waiter
    units: int
    deadline: float
    future: asyncio.Future
    priority: PriorityClass = PriorityClass.INTERACTIVE


class PlanWaiters:
    def __init__(self) -> None:
        self._waiters: dict[str, deque[_PlanWaiter]] = {}

    def has_waiters(self, account: str | None = None) -> bool:
        return bool(self._waiters) if account is None else account in self._waiters

    def count(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def has_room(self, account: Account) -> bool:
        plan_queue = account.plan.queue
        return plan_queue is not None and len(self._waiters.get(account.name, ())) < plan_queue.max_waiting

    async def wait(self, ledger: BudgetLedger, account: Account, units: int, now: float,
                   priority: PriorityClass = PriorityClass.INTERACTIVE) -> Grant:  # fmt: skip
        """Wait for the account's budget until the plan's deadline (``expire`` ends it)."""
        waiters = self._waiters.setdefault(account.name, deque())
        waiter = _PlanWaiter(account, units, now + account.plan.queue.timeout_s,
                             asyncio.get_running_loop().create_future(), priority)  # fmt: skip
        waiters.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if granted(waiter.future):  # granted just as the client left
                await ledger.release(waiter.future.result().lease)
            raise
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(account.name, None)

    async def wake(self, ledger: BudgetLedger, account: Account) -> None:
        """Grant the account's first waiters what the ledger now allows."""
        waiters = self._waiters.get(account.name)
        while waiters:
            head = waiters[0]
            if head.future.done():
                waiters.popleft()
                continue
            grant = await ledger.acquire(account.name, head.units, account.plan.concurrency)
            if grant.lease is None:
                return
            waiters.popleft()
            if head.future.done():  # its client left while we acquired
                await ledger.release(grant.lease)
                continue
            head.future.set_result(grant)
            return

    def expire(self, now: float, over_budget: Callable[[Account, int, PriorityClass], AdmissionError]) -> None:
        """Waiters past their deadline get ``over_budget(account, units, priority)``."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                if waiter.deadline <= now and not waiter.future.done():
                    waiter.future.set_exception(over_budget(waiter.account, waiter.units, waiter.priority))

    async def retry(self, ledger: BudgetLedger, accounts: dict[str, Account]) -> None:
        """Try every waiting account again (units may have been freed on other replicas)."""
        for name in list(self._waiters):
            waiters = self._waiters.get(name) or deque()
            live = next((w for w in waiters if not w.future.done()), None)
            if live is not None:
                # The account as the keys file has it now, or as the waiter knew it if a
                # reload removed it (its requests finish like running ones do).
                await self.wake(ledger, accounts.get(name, live.account))
