"""The engine capacity gate and its bounded, fair wait queue, with priority classes.

Guarantees:
- In flight on the engine at once: at most ``capacity.max_requests`` requests and at most
  ``capacity.kv_tokens`` estimated KV-cache tokens (one request always fits an empty engine).
- Reservation by class (``ClassShares``): ``batch`` requests hold at most ``batch`` x the
  engine's slots and x its KV-cache tokens, ``interactive`` and ``batch`` together at most
  ``interactive`` x each; the rest is headroom only more urgent classes use, so a ``stat``
  request never finds the engine full of lower classes, by slots or by KV cache. Lower
  classes soak up idle capacity up to their share and yield it as their requests end
  (running ones are never cut short). One request larger than its group's KV share still
  runs when its group holds nothing else (it would otherwise never run); while it runs,
  its group exceeds the share by that one request.
- Strict priority between classes: a free slot goes to the most urgent class waiting, and
  no request of a lower class overtakes a waiting one of a higher class.
- When a class cannot start, its requests wait in a bounded queue of their class
  (``max_waiting`` each, so a batch flood never fills STAT's queue); a request arriving at
  a full queue is rejected (``server_overloaded``), one whose deadline passes while
  waiting is evicted (``queue_timeout``), one whose client leaves is removed.
- Within a class the next slot goes to the waiting account that has received the least
  service recently (granted tokens, decayed with ``service_half_life_s``), FIFO within an
  account, so one heavy account cannot starve the others.
- Time comes from an injected clock; ``expire()`` evicts by deadline (a ticker calls it in
  production, tests call it after advancing a fake clock).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field

from serving.admission.clock import Clock
from serving.admission.outcomes import AdmissionError, Outcome
from serving.admission.priority import CLASSES, PriorityClass


@dataclass(frozen=True)
class Capacity:
    max_requests: int  # engine requests in flight at once
    kv_tokens: int  # KV-cache tokens the engine holds (estimates of prompt + max_tokens)


@dataclass(frozen=True)
class ClassShares:
    """Shares of the engine's slots the less urgent classes may hold (``stat`` may use all)."""

    interactive: float = 1.0  # interactive and batch together
    batch: float = 1.0

    def limits(self, engine_slots: int, max_requests: int) -> dict[PriorityClass, int]:
        """Most requests each class's group (the class and every less urgent one) may hold."""
        def cap(share: float) -> int:
            return max_requests if share >= 1.0 else max(1, int(share * engine_slots))

        return {PriorityClass.STAT: max_requests, PriorityClass.INTERACTIVE: cap(self.interactive),
                PriorityClass.BATCH: min(cap(self.batch), cap(self.interactive))}  # fmt: skip

    def token_limits(self, kv_tokens: int) -> dict[PriorityClass, int]:
        """Most estimated KV-cache tokens each class's group may hold."""
        interactive = int(min(1.0, self.interactive) * kv_tokens)
        return {PriorityClass.STAT: kv_tokens, PriorityClass.INTERACTIVE: interactive,
                PriorityClass.BATCH: min(int(min(1.0, self.batch) * kv_tokens), interactive)}  # fmt: skip


@dataclass
class Slot:
    account: str
    tokens: int
    priority: PriorityClass = PriorityClass.INTERACTIVE
    released: bool = False


@dataclass
class _Waiter:
    account: str
    tokens: int
    deadline: float
    enqueued_at: float
    seq: int
    future: asyncio.Future = field(repr=False)
    priority: PriorityClass = PriorityClass.INTERACTIVE


class FairQueue:
    def __init__(
        self,
        capacity: Capacity,
        max_waiting: int,
        clock: Clock,
        service_half_life_s: float = 30.0,
        shares: ClassShares | None = None,
        engine_slots: int | None = None,
    ):
        self.capacity = capacity
        self.max_waiting = max_waiting  # per class
        self.clock = clock
        self.half_life_s = service_half_life_s
        shares = shares or ClassShares()
        self.class_limits = shares.limits(engine_slots or capacity.max_requests, capacity.max_requests)
        self.class_token_limits = shares.token_limits(capacity.kv_tokens)
        self.inflight_requests = 0
        self.inflight_tokens = 0
        self._inflight_by_class = {cls: 0 for cls in CLASSES}
        self._tokens_by_class = {cls: 0 for cls in CLASSES}
        self._waiting: dict[PriorityClass, dict[str, deque[_Waiter]]] = {cls: {} for cls in CLASSES}
        self._depth = {cls: 0 for cls in CLASSES}
        self._service: dict[str, tuple[float, float]] = {}  # account -> (value, at)
        self._seq = itertools.count()

    # --- state ---------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return sum(self._depth.values())

    def depth_of(self, priority: PriorityClass) -> int:
        return self._depth[priority]

    def inflight_of(self, priority: PriorityClass) -> int:
        return self._inflight_by_class[priority]

    def service(self, account: str) -> float:
        value, at = self._service.get(account, (0.0, self.clock.now()))
        return value * 0.5 ** ((self.clock.now() - at) / self.half_life_s)

    def tokens_of(self, priority: PriorityClass) -> int:
        return self._tokens_by_class[priority]

    def _group_inflight(self, priority: PriorityClass) -> int:
        """Requests in flight of ``priority`` and every less urgent class."""
        return sum(n for cls, n in self._inflight_by_class.items() if cls.rank >= priority.rank)

    def _group_tokens(self, priority: PriorityClass) -> int:
        return sum(n for cls, n in self._tokens_by_class.items() if cls.rank >= priority.rank)

    def _fits(self, tokens: int, priority: PriorityClass) -> bool:
        if self.inflight_requests >= self.capacity.max_requests:
            return False
        for group in CLASSES[1 : priority.rank + 1]:  # every reserved group it belongs to
            if self._group_inflight(group) >= self.class_limits[group]:
                return False
            held = self._group_tokens(group)
            if held and held + tokens > self.class_token_limits[group]:
                return False
        return self.inflight_requests == 0 or self.inflight_tokens + tokens <= self.capacity.kv_tokens

    def _grant(self, account: str, tokens: int, priority: PriorityClass) -> Slot:
        self.inflight_requests += 1
        self.inflight_tokens += tokens
        self._inflight_by_class[priority] += 1
        self._tokens_by_class[priority] += tokens
        self._service[account] = (self.service(account) + tokens, self.clock.now())
        return Slot(account, tokens, priority)

    def _waiting_at_or_above(self, priority: PriorityClass) -> bool:
        return any(self._depth[cls] for cls in CLASSES[: priority.rank + 1])

    # --- acquire / release ---------------------------------------------------------
    def try_acquire(self, account: str, tokens: int, priority: PriorityClass = PriorityClass.INTERACTIVE) -> Slot | None:
        """A slot at once if no request of this class or a more urgent one waits and it fits; else None."""
        if not self._waiting_at_or_above(priority) and self._fits(tokens, priority):
            return self._grant(account, tokens, priority)
        return None

    def enqueue(self, account: str, tokens: int, timeout_s: float,
                priority: PriorityClass = PriorityClass.INTERACTIVE) -> _Waiter:  # fmt: skip
        """Join the class's queue; raises ``server_overloaded`` when it is full."""
        if self._depth[priority] >= self.max_waiting:
            raise AdmissionError(
                Outcome.REJECTED_QUEUE_FULL, "The server is at capacity and its queue is full."
            )
        now = self.clock.now()
        waiter = _Waiter(
            account, tokens, now + timeout_s, now, next(self._seq),
            asyncio.get_running_loop().create_future(), priority,
        )  # fmt: skip
        self._waiting[priority].setdefault(account, deque()).append(waiter)
        self._depth[priority] += 1
        self._dispatch()
        return waiter

    async def wait(self, waiter: _Waiter) -> Slot:
        """Wait for the waiter's slot; raises ``queue_timeout`` when its deadline passes."""
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self.remove(waiter)
            raise

    def remove(self, waiter: _Waiter) -> None:
        """Take a waiter out (its client left). A slot it was granted meanwhile is released."""
        queues = self._waiting[waiter.priority]
        queue = queues.get(waiter.account)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._depth[waiter.priority] -= 1
            if not queue:
                del queues[waiter.account]
            self._dispatch()  # it may have been the head that held the others back
        elif granted(waiter.future):
            self.release(waiter.future.result())
        if not waiter.future.done():
            waiter.future.cancel()

    def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self.inflight_requests -= 1
        self.inflight_tokens -= slot.tokens
        self._inflight_by_class[slot.priority] -= 1
        self._tokens_by_class[slot.priority] -= slot.tokens
        self._dispatch()

    def expire(self) -> int:
        """Evict waiters whose deadline has passed; returns how many."""
        now = self.clock.now()
        evicted = 0
        for cls, queues in self._waiting.items():
            for account in list(queues):
                queue = queues[account]
                for waiter in [w for w in queue if w.deadline <= now]:
                    queue.remove(waiter)
                    self._depth[cls] -= 1
                    evicted += 1
                    if not waiter.future.done():
                        waiter.future.set_exception(
                            AdmissionError(
                                Outcome.EVICTED_QUEUE_TIMEOUT,
                                "The request waited too long for a free engine slot.",
                            )
                        )
                if not queue:
                    del queues[account]
        if evicted:
            self._dispatch()
        return evicted

    def fail_all(self, error: AdmissionError) -> int:
        """Evict every waiter with ``error`` (the engine failed); returns how many."""
        failed = 0
        for queues in self._waiting.values():
            for queue in queues.values():
                for waiter in queue:
                    if not waiter.future.done():
                        waiter.future.set_exception(error)
                        failed += 1
            queues.clear()
        self._depth = {cls: 0 for cls in CLASSES}
        return failed

    def _dispatch(self) -> None:
        """Grant free slots: the most urgent class first; within it the least-served account."""
        for cls in CLASSES:
            queues = self._waiting[cls]
            while queues:
                account = min(queues, key=lambda a: (self.service(a), queues[a][0].seq))
                head = queues[account][0]
                if not self._fits(head.tokens, cls):
                    return  # head-of-line: nothing less urgent, and nobody later in this class, overtakes
                queues[account].popleft()
                if not queues[account]:
                    del queues[account]
                self._depth[cls] -= 1
                if head.future.done():
                    continue
                head.future.set_result(self._grant(account, head.tokens, cls))

    def waited_s(self, waiter: _Waiter) -> float:
        return self.clock.now() - waiter.enqueued_at


def granted(future: asyncio.Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
