"""The admission decision for one request: key -> budget -> context -> engine capacity.

Guarantees:
- Order: an unknown key is refused (401) before anything else; a request whose prompt plus
  ``max_tokens`` cannot fit the context is refused (400) before it holds anything; then
  the account's budget (429, or a bounded wait when its plan allows); then the engine's
  capacity (a fair, bounded queue with a deadline: 503 when full or too late).
- A ``Ticket`` holds the account's units from admission until ``release()``, which is
  idempotent and frees the ledger lease and the engine slot together. Any failure after
  the lease was taken releases it before the error leaves.
- ``Retry-After`` comes from the observed completion rate, not a constant.
- With an in-process ledger, a request that fits its budget and the engine at once is
  decided and released without suspending (``admit_now`` / a synchronous release): the
  common case costs no event-loop round trip.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.admission.clock import Clock, MonotonicClock
from serving.admission.estimate import RequestShape
from serving.admission.keys import Account, KeyStore
from serving.admission.ledger import BudgetLedger, Grant, Lease, LedgerUnavailable
from serving.admission.outcomes import AdmissionError, Outcome
from serving.admission.queue import FairQueue, Slot, granted
from serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

_RELEASING: set[asyncio.Task] = set()  # releases in flight, referenced until done

RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60


class CompletionRate:
    """Completions per second over a sliding window."""

    def __init__(self, clock: Clock, window_s: float = 30.0):
        self.clock = clock
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._since = clock.now()

    def record(self) -> None:
        self._times.append(self.clock.now())

    def per_second(self) -> float:
        now = self.clock.now()
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
        span = min(self.window_s, max(now - self._since, 1.0))
        return len(self._times) / span


def retry_after_s(work_ahead: float, rate_per_s: float) -> int:
    """Seconds until ``work_ahead`` completions are expected at ``rate_per_s``, clamped."""
    if rate_per_s <= 0:
        return RETRY_AFTER_MAX_S // 4
    return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, math.ceil(work_ahead / rate_per_s)))


ENGINE_FAILED_MESSAGE = "The model engine on this replica failed; retry, another replica will serve it."


@dataclass
class Ticket:
    account: Account
    lease: Lease
    slot: Slot | None
    inflight_after: int
    controller: AdmissionController = field(repr=False)
    released: bool = False

    @property
    def limit(self) -> int:
        return self.account.plan.concurrency

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.inflight_after)

    async def release(self) -> None:
        """Free the units. Runs to completion even if the caller is cancelled (Starlette
        cancels a finished stream's task while the ledger call is in flight)."""
        if self.released:
            return
        self.released = True
        if self.controller._release_now(self):
            return
        task = asyncio.ensure_future(self.controller._release(self))
        _RELEASING.add(task)
        task.add_done_callback(_RELEASING.discard)
        await asyncio.shield(task)


@dataclass
class _PlanWaiter:
    account: Account  # as it was on arrival: a key reload that removes it does not strand the waiter
    units: int
    deadline: float
    future: asyncio.Future


class AdmissionController:
    def __init__(
        self,
        keys: KeyStore,
        ledger: BudgetLedger,
        queue: FairQueue,
        metrics: ServingMetrics,
        *,
        max_model_len: int,
        model_costs: dict[str, int],
        queue_timeout_s: float,
        clock: Clock | None = None,
        engine_units: int | None = None,
        engine_dead: Callable[[], bool] = lambda: False,
    ):
        self.keys = keys
        self.ledger = ledger
        self.queue = queue
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.model_costs = model_costs
        self.default_cost = max(model_costs.values(), default=1)
        self.queue_timeout_s = queue_timeout_s
        self.clock = clock or MonotonicClock()
        self.draining = False
        self.engine_failed = False  # set by fail_engine (EngineWatch)
        # Read on every request: between the engine dying and EngineWatch's next look, a
        # request must not reach vLLM (which answers a dead engine with a 500).
        self.engine_dead = engine_dead
        self.completions = CompletionRate(self.clock)
        self._account_completions: dict[str, CompletionRate] = {}
        self._plan_waiters: dict[str, deque[_PlanWaiter]] = {}
        self._waiting = asyncio.Event()  # set when a request starts waiting: wakes the ticker
        self.capacity_units = engine_units if engine_units is not None else queue.capacity.max_requests
        metrics.capacity_units.set(self.capacity_units)
        self._running_units = 0  # units of the requests admitted here and not yet finished
        self._waiting_units = 0  # units of the requests waiting here (budget or engine slot)

    # --- the decision ------------------------------------------------------------------
    def authenticate(self, api_key: str | None) -> Account:
        account = self.keys.authenticate(api_key)
        if account is None:
            self._count(Outcome.REJECTED_INVALID_KEY)
            raise AdmissionError(Outcome.REJECTED_INVALID_KEY, "Invalid or missing API key.")
        return account

    def cost(self, model: str | None) -> int:
        return self.model_costs.get(model or "", self.default_cost)

    def admit_now(self, account: Account, shape: RequestShape) -> Ticket | None:
        """The same decision as ``admit`` without suspending, or None when it would have to
        wait (a round-trip ledger, a plan queue, a full engine): then call ``admit``."""
        if not self.ledger.synchronous:
            return None
        units, tokens = self._check(shape, account)
        grant = self.ledger.acquire_now(account.name, units, account.plan.concurrency)
        if grant.lease is None:
            if account.plan.queue is not None:
                return None
            raise self._over_budget(account, units, grant.inflight)
        slot = self.queue.try_acquire(account.name, tokens)
        if slot is None:
            self.ledger.release_now(grant.lease)
            return None
        self.metrics.queue_wait_seconds.observe(0.0)
        return self._admitted(account, grant, slot)

    async def admit(self, account: Account, shape: RequestShape) -> Ticket:
        units, tokens = self._check(shape, account)
        self._waiting_units += units  # demand while it waits for its budget or a slot
        try:
            grant = await self._acquire_budget(account, units)
            try:
                slot = await self._acquire_slot(account.name, tokens)
            except BaseException:
                await self._release_lease(account, grant.lease)
                raise
        finally:
            self._waiting_units -= units
        return self._admitted(account, grant, slot)

    def _admitted(self, account: Account, grant: Grant, slot: Slot) -> Ticket:
        self._count(Outcome.ADMITTED)
        self.metrics.inflight_units.labels(plan=account.plan.name).inc(grant.lease.units)
        self._running_units += grant.lease.units
        return Ticket(account, grant.lease, slot, grant.inflight, self)

    def count(self, outcome: Outcome) -> None:
        """Count a refusal made before admission (by the request guard)."""
        self._count(outcome)

    def _check(self, shape: RequestShape, account: Account) -> tuple[int, int]:
        """Refusals that hold nothing (draining, plan, context); returns (units, KV tokens).

        A request costs its model's cost once per engine sequence it creates (``n`` per
        prompt, and a batched completion has several prompts); one that needs more units
        than its plan has could never run, so it gets a 400, not a 429."""
        if self.draining:
            raise self._reject(
                Outcome.REJECTED_DRAINING, "The server is shutting down.", retry_after=5
            )
        if self.engine_failed or self.engine_dead():
            raise self._reject(Outcome.REJECTED_ENGINE_FAILED, ENGINE_FAILED_MESSAGE, retry_after=10)
        units = self.cost(shape.model) * shape.engine_requests
        if units > account.plan.concurrency:
            batch = f"{shape.prompts} prompts x " if shape.prompts > 1 else ""
            raise self._reject(
                Outcome.REJECTED_EXCEEDS_PLAN,
                f"This request needs {units} concurrency units ({batch}n={shape.sequences} x "
                f"model cost {self.cost(shape.model)}); the account's plan allows "
                f"{account.plan.concurrency}. Lower n or send fewer prompts at once.",
            )
        max_tokens = shape.max_tokens
        if max_tokens is None:
            max_tokens = max(0, self.max_model_len - shape.prompt_tokens)
        if shape.prompt_tokens + max_tokens > self.max_model_len:
            raise self._reject(
                Outcome.REJECTED_CONTEXT_LENGTH,
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"request needs at least {shape.prompt_tokens} prompt tokens plus max_tokens "
                f"{max_tokens}. Shorten the prompt or lower max_tokens.",
            )
        total_prompt = shape.total_prompt_tokens if shape.total_prompt_tokens is not None else shape.prompt_tokens
        return units, total_prompt + max_tokens * shape.engine_requests

    async def _acquire_budget(self, account: Account, units: int) -> Grant:
        budget = account.plan.concurrency
        try:
            grant = await self.ledger.acquire(account.name, units, budget)
        except LedgerUnavailable:
            raise self._reject(
                Outcome.REJECTED_LEDGER_UNAVAILABLE,
                "The budget ledger is unavailable; retry shortly.",
                retry_after=5,
            ) from None
        if grant.lease is not None:
            return grant
        plan_queue = account.plan.queue
        waiting = len(self._plan_waiters.get(account.name, ()))
        if plan_queue is None or waiting >= plan_queue.max_waiting:
            raise self._over_budget(account, units, grant.inflight)
        waiters = self._plan_waiters.setdefault(account.name, deque())
        waiter = _PlanWaiter(
            account,
            units,
            self.clock.now() + plan_queue.timeout_s,
            asyncio.get_running_loop().create_future(),
        )
        waiters.append(waiter)
        self._waiting.set()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if granted(waiter.future):  # granted just as the client left
                await self.ledger.release(waiter.future.result().lease)
            self._count(Outcome.EVICTED_CLIENT_GONE)
            raise
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._plan_waiters.pop(account.name, None)

    def fail_engine(self) -> int:
        """The engine died or hung: refuse new requests, evict every queued one (503
        ``engine_unavailable``); returns how many were evicted."""
        self.engine_failed = True
        error = AdmissionError(Outcome.EVICTED_ENGINE_FAILED, ENGINE_FAILED_MESSAGE, retry_after_s=10)
        evicted = self.queue.fail_all(error)
        for _ in range(evicted):
            self._count(Outcome.EVICTED_ENGINE_FAILED)
        self.metrics.queue_depth.set(self.queue.depth)
        return evicted

    async def _acquire_slot(self, account: str, tokens: int) -> Slot:
        if self.engine_failed or self.engine_dead():  # a plan waiter granted budget after the engine failed
            raise self._reject(Outcome.REJECTED_ENGINE_FAILED, ENGINE_FAILED_MESSAGE, retry_after=10)
        slot = self.queue.try_acquire(account, tokens)
        if slot is not None:
            self.metrics.queue_wait_seconds.observe(0.0)
            return slot
        try:
            waiter = self.queue.enqueue(account, tokens, self.queue_timeout_s)
        except AdmissionError as error:
            error.retry_after_s = self._retry_engine()
            self._count(error.outcome)
            raise
        self.metrics.queue_depth.set(self.queue.depth)
        self._waiting.set()
        try:
            slot = await self.queue.wait(waiter)
        except AdmissionError as error:
            if error.outcome is Outcome.EVICTED_ENGINE_FAILED:
                raise  # counted by fail_engine, with its own Retry-After
            error.retry_after_s = self._retry_engine()
            self._count(error.outcome)
            raise
        except asyncio.CancelledError:
            self._count(Outcome.EVICTED_CLIENT_GONE)
            raise
        finally:
            self.metrics.queue_depth.set(self.queue.depth)
            self.metrics.queue_wait_seconds.observe(self.queue.waited_s(waiter))
        return slot

    # --- release -------------------------------------------------------------------------
    def _release_now(self, ticket: Ticket) -> bool:
        """Release without suspending when nothing needs I/O; False: use ``_release``."""
        if not self.ledger.synchronous or ticket.account.name in self._plan_waiters:
            return False
        self._release_local(ticket)
        self.ledger.release_now(ticket.lease)
        return True

    async def _release(self, ticket: Ticket) -> None:
        self._release_local(ticket)
        await self._release_lease(ticket.account, ticket.lease)

    def _release_local(self, ticket: Ticket) -> None:
        if ticket.slot is not None:
            self.queue.release(ticket.slot)
        self.metrics.inflight_units.labels(plan=ticket.account.plan.name).dec(ticket.lease.units)
        self._running_units -= ticket.lease.units
        self.completions.record()
        self._account_rate(ticket.account.name).record()

    async def _release_lease(self, account: Account, lease: Lease | None) -> None:
        if lease is None:
            return
        try:
            await self.ledger.release(lease)
        finally:
            await self._wake_plan_waiter(account)

    async def _wake_plan_waiter(self, account: Account) -> None:
        waiters = self._plan_waiters.get(account.name)
        while waiters:
            head = waiters[0]
            if head.future.done():
                waiters.popleft()
                continue
            grant = await self.ledger.acquire(account.name, head.units, account.plan.concurrency)
            if grant.lease is None:
                return
            waiters.popleft()
            if head.future.done():  # its client left while we acquired
                await self.ledger.release(grant.lease)
                continue
            head.future.set_result(grant)
            return

    async def tick(self) -> None:
        """Evict by deadline and retry plan waiters (whose units may be freed elsewhere)."""
        if self.queue.expire():
            self.metrics.queue_depth.set(self.queue.depth)
        now = self.clock.now()
        for name in list(self._plan_waiters):
            waiters = self._plan_waiters.get(name) or deque()
            for waiter in [w for w in waiters if w.deadline <= now and not w.future.done()]:
                plan = waiter.account.plan
                waiter.future.set_exception(
                    self._over_budget(waiter.account, waiter.units, plan.concurrency, waited=True)
                )
            live = next((w for w in waiters if not w.future.done()), None)
            if live is not None:
                # The account as the keys file has it now, or as the waiter knew it if a
                # reload removed it (its requests finish like running ones do).
                await self._wake_plan_waiter(self.keys.accounts.get(name, live.account))

    def demand_units(self) -> int:
        """The autoscaling signal of this replica: units of the requests it serves plus those
        of the requests waiting here for their plan's budget or an engine slot."""
        return self._running_units + self._waiting_units

    def busy(self) -> int:
        """Admitted requests not yet finished: on the engine, queued for it, or waiting on
        their plan (what a drain waits for)."""
        return (
            self.queue.inflight_requests
            + self.queue.depth
            + sum(len(w) for w in self._plan_waiters.values())
        )

    def _has_waiters(self) -> bool:
        return self.queue.depth > 0 or bool(self._plan_waiters)

    async def run_ticker(self, interval_s: float = 0.05) -> None:
        """Deadlines and cross-replica retries, only while someone waits (idle: no wake-ups)."""
        while True:
            if not self._has_waiters():
                self._waiting.clear()
                await self._waiting.wait()
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except Exception:
                logger.exception("admission tick failed")

    # --- errors and Retry-After ------------------------------------------------------------
    def _account_rate(self, account: str) -> CompletionRate:
        rate = self._account_completions.get(account)
        if rate is None:
            rate = self._account_completions[account] = CompletionRate(self.clock)
        return rate

    def _over_budget(
        self, account: Account, units: int, inflight: int, waited: bool = False
    ) -> AdmissionError:
        rate = self._account_rate(account.name).per_second()
        message = (
            f"Concurrency limit reached: the account's plan allows {account.plan.concurrency} "
            f"concurrent units and {inflight} are in use."
        )
        if waited:
            message += " The request waited for its plan's queue deadline."
        return self._reject(
            Outcome.REJECTED_OVER_BUDGET, message, retry_after=retry_after_s(units, rate)
        )

    def _retry_engine(self) -> int:
        return retry_after_s(self.queue.depth + 1, self.completions.per_second())

    def _reject(self, outcome: Outcome, message: str, retry_after: float | None = None):
        self._count(outcome)
        return AdmissionError(outcome, message, retry_after)

    def _count(self, outcome: Outcome) -> None:
        self.metrics.admission_total.labels(outcome=outcome.value).inc()
