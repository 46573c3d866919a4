"""The admission decision (key -> budget -> context -> engine slot) and the requests it admitted.

Guarantees:
- Order: an unknown key is refused (401) before anything else; a request whose prompt plus
  ``max_tokens`` cannot fit the context is refused (400) before it holds anything; then
  the account's budget (429, or a bounded wait when its plan allows); then the engine's
  capacity (a fair, bounded queue with a deadline: 503 when full or too late).
- Every admitted request is an ``AdmittedRequest`` that owns its lease and slot until its
  ``end``; the controller frees them only when that end asks it to (``release``). A
  refusal after the lease was taken ends the request with the refusal's outcome first.
- ``Retry-After`` comes from the observed completion rate, not a constant.
- With an in-process ledger, a request that fits its budget and the engine at once is
  decided and released without suspending (``decide`` and a synchronous ``release``).
- Public surface: authenticate, decide, wait, release, remaining, drain, fail_engine,
  end_running, end_stalled, and the read-outs (busy, demand_units, running_count).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from serving.admission.clock import Clock, MonotonicClock
from serving.admission.estimate import RequestShape
from serving.admission.keys import Account, KeyStore
from serving.admission.ledger import BudgetLedger, Grant, LedgerUnavailable
from serving.admission.outcomes import AdmissionError, Outcome
from serving.admission.planwait import PlanWaiters
from serving.admission.priority import PriorityClass
from serving.admission.queue import FairQueue
from serving.admission.rates import CompletionRates, retry_after_s
from serving.admission.request import AdmittedRequest
from serving.enginehealth import EngineHealth
from serving.metrics import ServingMetrics

logger = logging.getLogger(__name__)

ENGINE_FAILED_MESSAGE = "The model engine on this replica failed; retry, another replica will serve it."
STALLED_MESSAGE = "The client stopped reading its response."


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
        batch_queue_timeout_s: float | None = None,
        scale_on_batch: bool = False,
        clock: Clock | None = None,
        engine_units: int | None = None,
        health: EngineHealth | None = None,
        abort: Callable[[list[str]], Awaitable[None]] | None = None,
    ):
        self.keys = keys
        self.ledger = ledger
        self.queue = queue
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.model_costs = model_costs
        self.default_cost = max(model_costs.values(), default=1)
        self.queue_timeouts = {cls: queue_timeout_s for cls in PriorityClass}  # per class
        if batch_queue_timeout_s is not None:
            self.queue_timeouts[PriorityClass.BATCH] = batch_queue_timeout_s
        # Classes whose demand scales the deployment: batch only uses idle capacity unless told.
        self.scaling_classes = frozenset(c for c in PriorityClass if scale_on_batch or c is not PriorityClass.BATCH)
        self.clock = clock or MonotonicClock()
        self.health = health or EngineHealth()
        self.abort = abort  # aborts engine requests by vLLM's external ids
        self.draining = False
        self.completions = CompletionRates(self.clock)
        self.capacity_units = engine_units if engine_units is not None else queue.capacity.max_requests
        metrics.capacity_units.set(self.capacity_units)
        metrics.computed(metrics.demand_units, self.demand_units)  # what Ray's policy and the rules read
        self._plan_waiters = PlanWaiters()
        self._waiting = asyncio.Event()  # set when a request starts waiting: wakes the ticker
        self._running: set[AdmittedRequest] = set()  # admitted, not yet released
        self._running_units = {cls: 0 for cls in PriorityClass}  # admitted here, not yet released
        self._waiting_units = {cls: 0 for cls in PriorityClass}  # waiting here (budget or engine slot)

    # --- the decision ------------------------------------------------------------------
    def authenticate(self, api_key: str | None) -> Account:
        account = self.keys.authenticate(api_key)
        if account is None:
            raise self._reject(Outcome.REJECTED_INVALID_KEY, "Invalid or missing API key.")
        return account

    def count(self, outcome: Outcome, priority: PriorityClass | None = None) -> None:
        """Count a decision (the guard's refusals, made before a class is known, too)."""
        self.metrics.admission_total.labels(outcome=outcome.value, priority=priority.value if priority else "none").inc()

    def cost(self, model: str | None) -> int:
        return self.model_costs.get(model or "", self.default_cost)

    def decide(self, account: Account, shape: RequestShape) -> AdmittedRequest | None:
        """Admit or refuse at once, without suspending; None when the request would have to
        wait (a round-trip ledger, a plan queue, a full engine): then call ``wait``."""
        if not self.ledger.synchronous:
            return None
        request = self._request(account, shape)
        grant = self.ledger.acquire_now(account.name, request.units, account.plan.concurrency)
        if grant.lease is None:
            if account.plan.queue is not None:
                return None
            raise self._over_budget(account, request.units, grant.inflight, request.priority)
        slot = self.queue.try_acquire(account.name, request.kv_tokens, request.priority)
        if slot is None:
            self.ledger.release_now(grant.lease)
            return None
        self.metrics.queue_wait_seconds.labels(priority=request.priority.value).observe(0.0)
        return self._admitted(request, grant, slot)

    async def wait(self, account: Account, shape: RequestShape) -> AdmittedRequest:
        """The slow path: the ledger's round trip, the plan's queue, the engine's queue.
        Cancelling it (the client left) ends the request and frees whatever it held."""
        request = self._request(account, shape)
        self._waiting_units[request.priority] += request.units  # demand while it waits
        try:
            grant = await self._acquire_budget(account, request.units, request.priority)
            request.lease, request.budget_at = grant.lease, time.monotonic()
            slot = await self._acquire_slot(account.name, request.kv_tokens, request.priority)
        except BaseException as exc:
            outcome = exc.outcome if isinstance(exc, AdmissionError) else Outcome.EVICTED_CLIENT_GONE
            await request.end(outcome)
            raise
        finally:
            self._waiting_units[request.priority] -= request.units
        return self._admitted(request, grant, slot)

    def _request(self, account: Account, shape: RequestShape) -> AdmittedRequest:
        units, tokens = self._check(shape, account)
        return AdmittedRequest(account, units, tokens, self.release, self.abort, shape.priority)

    def _admitted(self, request: AdmittedRequest, grant: Grant, slot) -> AdmittedRequest:
        self.count(Outcome.ADMITTED, request.priority)
        request.admitted(grant.lease, slot, grant.inflight)
        self.metrics.inflight_units.labels(plan=request.account.plan.name).inc(request.units)
        self.metrics.inflight_requests.labels(priority=request.priority.value).inc()
        self._running_units[request.priority] += request.units
        self._running.add(request)
        return request

    def _check(self, shape: RequestShape, account: Account) -> tuple[int, int]:
        """Refusals that hold nothing (draining, engine, plan, context); returns (units,
        KV tokens). A request costs its model's cost once per engine sequence it creates
        (``n`` per prompt, and a batched completion has several prompts); one that needs
        more units than its plan has could never run, so it gets a 400, not a 429."""
        priority = shape.priority
        if self.draining:
            raise self._reject(Outcome.REJECTED_DRAINING, "The server is shutting down.", 5, priority)
        if self.health.failed:
            raise self._reject(Outcome.REJECTED_ENGINE_FAILED, ENGINE_FAILED_MESSAGE, 10, priority)
        units = self.cost(shape.model) * shape.engine_requests
        if units > account.plan.concurrency:
            batch = f"{shape.prompts} prompts x " if shape.prompts > 1 else ""
            raise self._reject(
                Outcome.REJECTED_EXCEEDS_PLAN,
                f"This request needs {units} concurrency units ({batch}n={shape.sequences} x "
                f"model cost {self.cost(shape.model)}); the account's plan allows "
                f"{account.plan.concurrency}. Lower n or send fewer prompts at once.",
                priority=priority,
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
                priority=priority,
            )
        total_prompt = shape.total_prompt_tokens if shape.total_prompt_tokens is not None else shape.prompt_tokens
        return units, total_prompt + max_tokens * shape.engine_requests

    async def _acquire_budget(self, account: Account, units: int, priority: PriorityClass) -> Grant:
        try:
            grant = await self.ledger.acquire(account.name, units, account.plan.concurrency)
        except LedgerUnavailable:
            raise self._reject(
                Outcome.REJECTED_LEDGER_UNAVAILABLE, "The budget ledger is unavailable; retry shortly.", 5, priority
            ) from None
        if grant.lease is not None:
            return grant
        if not self._plan_waiters.has_room(account):
            raise self._over_budget(account, units, grant.inflight, priority)
        self._waiting.set()
        try:
            return await self._plan_waiters.wait(self.ledger, account, units, self.clock.now(), priority)
        except asyncio.CancelledError:
            self.count(Outcome.EVICTED_CLIENT_GONE, priority)
            raise

    async def _acquire_slot(self, account: str, tokens: int, priority: PriorityClass):
        if self.health.failed:  # a plan waiter granted budget after the engine failed
            raise self._reject(Outcome.REJECTED_ENGINE_FAILED, ENGINE_FAILED_MESSAGE, 10, priority)
        waited = self.metrics.queue_wait_seconds.labels(priority=priority.value)
        slot = self.queue.try_acquire(account, tokens, priority)
        if slot is not None:
            waited.observe(0.0)
            return slot
        try:
            waiter = self.queue.enqueue(account, tokens, self.queue_timeouts[priority], priority)
        except AdmissionError as error:
            error.retry_after_s = self._retry_engine()
            self.count(error.outcome, priority)
            raise
        self.metrics.queue_depth.set(self.queue.depth)
        self._waiting.set()
        try:
            slot = await self.queue.wait(waiter)
        except AdmissionError as error:
            if error.outcome is Outcome.EVICTED_ENGINE_FAILED:
                raise  # counted by fail_engine, with its own Retry-After
            error.retry_after_s = self._retry_engine()
            self.count(error.outcome, priority)
            raise
        except asyncio.CancelledError:
            self.count(Outcome.EVICTED_CLIENT_GONE, priority)
            raise
        finally:
            self.metrics.queue_depth.set(self.queue.depth)
            waited.observe(self.queue.waited_s(waiter))
        return slot

    # --- release (only AdmittedRequest.end calls it) -------------------------------------
    def release(self, request: AdmittedRequest) -> Awaitable[None] | None:
        """Free the slot and the lease ``request`` holds. Returns None when it is done
        (no I/O was needed), else what to await for the ledger's release."""
        running = self._running
        if request in running:
            running.remove(request)
            self.queue.release(request.slot)
            self.metrics.inflight_units.labels(plan=request.account.plan.name).dec(request.units)
            self.metrics.inflight_requests.labels(priority=request.priority.value).dec()
            self._running_units[request.priority] -= request.units
            self.completions.record(request.account.name)
        lease, request.lease = request.lease, None
        if lease is None:
            return None
        if self.ledger.synchronous and not self._plan_waiters.has_waiters(request.account.name):
            self.ledger.release_now(lease)
            return None
        return self._release_lease(request.account, lease)

    async def _release_lease(self, account: Account, lease) -> None:
        try:
            await self.ledger.release(lease)
        finally:
            await self._plan_waiters.wake(self.ledger, account)

    async def remaining(self, account: Account) -> int:
        """Units the account may still take (its ``x-ratelimit-remaining-concurrency``)."""
        return max(0, account.plan.concurrency - await self.ledger.inflight(account.name))

    # --- drain, engine failure, stalled clients ---------------------------------------------
    def drain(self) -> None:
        """Refuse new requests (503 ``draining``); admitted ones run on."""
        self.draining = True

    def fail_engine(self, why: str = "died") -> int:
        """The engine died or hung: refuse new requests, evict every queued one (503
        ``engine_unavailable``); returns how many were evicted. ``end_running`` ends the
        running ones."""
        self.health.declare_failed(why)
        error = AdmissionError(Outcome.EVICTED_ENGINE_FAILED, ENGINE_FAILED_MESSAGE, retry_after_s=10)
        for priority in PriorityClass:
            for _ in range(self.queue.depth_of(priority)):
                self.count(Outcome.EVICTED_ENGINE_FAILED, priority)
        evicted = self.queue.fail_all(error)
        self.metrics.queue_depth.set(self.queue.depth)
        return evicted

    async def end_running(self, outcome: Outcome, message: str) -> None:
        """End every running request now with ``outcome`` (a drain's grace is over, or the
        engine failed): its engine request is aborted, the client gets a clear error, its
        units are released before this returns."""
        await asyncio.gather(*(request.end(outcome, message) for request in list(self._running)))

    async def end_stalled(self, stall_timeout_s: float, now: float | None = None) -> int:
        """End the requests whose client has not taken a response chunk for
        ``stall_timeout_s`` (it stopped reading; the send is blocked on back-pressure):
        aborted and released, so a client that never reads cannot hold units."""
        now = time.monotonic() if now is None else now
        stalled = [r for r in self._running if not r.ended and r.stalled_s(now) > stall_timeout_s]
        if stalled:
            logger.warning("ending %d requests whose clients stopped reading for %.0fs", len(stalled), stall_timeout_s)
            await asyncio.gather(*(r.end(Outcome.EVICTED_CLIENT_STALLED, STALLED_MESSAGE) for r in stalled))
        return len(stalled)

    async def watch_stalled(self, stall_timeout_s: float, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.end_stalled(stall_timeout_s)

    # --- read-outs -----------------------------------------------------------------------
    @property
    def running_count(self) -> int:
        """Requests admitted here whose end has not completed."""
        return len(self._running)

    def demand_units(self) -> int:
        """The autoscaling signal of this replica: units of the requests it serves plus those
        of the requests waiting here for their plan's budget or an engine slot, of the
        classes that scale (``scaling_classes``: not batch, unless ``scale_on_batch``)."""
        return sum(self._running_units[c] + self._waiting_units[c] for c in self.scaling_classes)

    def busy(self) -> int:
        """Admitted requests not yet finished: on the engine, queued for it, or waiting on
        their plan (what a drain waits for)."""
        return self.queue.inflight_requests + self.queue.depth + self._plan_waiters.count()

    def has_waiters(self) -> bool:
        return self.queue.depth > 0 or self._plan_waiters.has_waiters()

    # --- deadlines -------------------------------------------------------------------------
    async def tick(self) -> None:
        """Evict by deadline and retry plan waiters (whose units may be freed elsewhere)."""
        if self.queue.expire():
            self.metrics.queue_depth.set(self.queue.depth)
        self._plan_waiters.expire(self.clock.now(), self._expired_plan_wait)
        await self._plan_waiters.retry(self.ledger, self.keys.accounts)

    async def run_ticker(self, interval_s: float = 0.05) -> None:
        """Deadlines and cross-replica retries, only while someone waits (idle: no wake-ups)."""
        while True:
            if not self.has_waiters():
                self._waiting.clear()
                await self._waiting.wait()
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except Exception:
                logger.exception("admission tick failed")

    # --- errors and Retry-After ------------------------------------------------------------
    def _expired_plan_wait(self, account: Account, units: int, priority: PriorityClass) -> AdmissionError:
        return self._over_budget(account, units, account.plan.concurrency, priority, waited=True)

    def _over_budget(self, account: Account, units: int, inflight: int, priority: PriorityClass,
                     waited: bool = False) -> AdmissionError:  # fmt: skip
        rate = self.completions.of(account.name).per_second()
        message = (
            f"Concurrency limit reached: the account's plan allows {account.plan.concurrency} "
            f"concurrent units and {inflight} are in use."
        )
        if waited:
            message += " The request waited for its plan's queue deadline."
        return self._reject(Outcome.REJECTED_CONCURRENCY_LIMIT, message, retry_after_s(units, rate), priority)

    def _retry_engine(self) -> int:
        return retry_after_s(self.queue.depth + 1, self.completions.all.per_second())

    def _reject(self, outcome: Outcome, message: str, retry_after: float | None = None,
                priority: PriorityClass | None = None) -> AdmissionError:  # fmt: skip
        self.count(outcome, priority)
        return AdmissionError(outcome, message, retry_after)
