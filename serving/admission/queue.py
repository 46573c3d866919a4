"""The engine capacity gate and its bounded, fair wait queue.

Guarantees:
- In flight on the engine at once: at most ``capacity.max_requests`` requests and at most
  ``capacity.kv_tokens`` estimated KV-cache tokens (one request always fits an empty engine).
- When the engine is full, requests wait in one bounded queue (``max_waiting``); a request
  arriving at a full queue is rejected (``server_overloaded``), one whose deadline passes
  while waiting is evicted (``queue_timeout``), one whose client leaves is removed.
- The next free slot goes to the waiting account that has received the least service
  recently (granted tokens, decayed with ``service_half_life_s``), FIFO within an account,
  so one heavy account cannot starve the others.
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


@dataclass(frozen=True)
class Capacity:
    max_requests: int  # engine requests in flight at once
    kv_tokens: int  # KV-cache tokens the engine holds (estimates of prompt + max_tokens)


@dataclass
class Slot:
    account: str
    tokens: int
    released: bool = False


@dataclass
class _Waiter:
    account: str
    tokens: int
    deadline: float
    enqueued_at: float
    seq: int
    future: asyncio.Future = field(repr=False)


class FairQueue:
    def __init__(
        self,
        capacity: Capacity,
        max_waiting: int,
        clock: Clock,
        service_half_life_s: float = 30.0,
    ):
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.clock = clock
        self.half_life_s = service_half_life_s
        self.inflight_requests = 0
        self.inflight_tokens = 0
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._depth = 0
        self._service: dict[str, tuple[float, float]] = {}  # account -> (value, at)
        self._seq = itertools.count()

    # --- state ---------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._depth

    def service(self, account: str) -> float:
        value, at = self._service.get(account, (0.0, self.clock.now()))
        return value * 0.5 ** ((self.clock.now() - at) / self.half_life_s)

    def _fits(self, tokens: int) -> bool:
        if self.inflight_requests >= self.capacity.max_requests:
            return False
        return self.inflight_requests == 0 or self.inflight_tokens + tokens <= self.capacity.kv_tokens

    def _grant(self, account: str, tokens: int) -> Slot:
        self.inflight_requests += 1
        self.inflight_tokens += tokens
        self._service[account] = (self.service(account) + tokens, self.clock.now())
        return Slot(account, tokens)

    # --- acquire / release ---------------------------------------------------------
    def try_acquire(self, account: str, tokens: int) -> Slot | None:
        """A slot at once if nobody waits and the request fits; else None."""
        if self._depth == 0 and self._fits(tokens):
            return self._grant(account, tokens)
        return None

    def enqueue(self, account: str, tokens: int, timeout_s: float) -> _Waiter:
        """Join the queue; raises ``server_overloaded`` when it is full."""
        if self._depth >= self.max_waiting:
            raise AdmissionError(
                Outcome.REJECTED_QUEUE_FULL, "The server is at capacity and its queue is full."
            )
        now = self.clock.now()
        waiter = _Waiter(
            account, tokens, now + timeout_s, now, next(self._seq),
            asyncio.get_running_loop().create_future(),
        )  # fmt: skip
        self._waiting.setdefault(account, deque()).append(waiter)
        self._depth += 1
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
        queue = self._waiting.get(waiter.account)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._depth -= 1
            if not queue:
                del self._waiting[waiter.account]
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
        self._dispatch()

    def expire(self) -> int:
        """Evict waiters whose deadline has passed; returns how many."""
        now = self.clock.now()
        evicted = 0
        for account in list(self._waiting):
            queue = self._waiting[account]
            for waiter in [w for w in queue if w.deadline <= now]:
                queue.remove(waiter)
                self._depth -= 1
                evicted += 1
                if not waiter.future.done():
                    waiter.future.set_exception(
                        AdmissionError(
                            Outcome.EVICTED_QUEUE_TIMEOUT,
                            "The request waited too long for a free engine slot.",
                        )
                    )
            if not queue:
                del self._waiting[account]
        if evicted:
            self._dispatch()
        return evicted

    def fail_all(self, error: AdmissionError) -> int:
        """Evict every waiter with ``error`` (the engine failed); returns how many."""
        failed = 0
        for queue in self._waiting.values():
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.set_exception(error)
                    failed += 1
        self._waiting.clear()
        self._depth = 0
        return failed

    def _dispatch(self) -> None:
        while self._waiting:
            account = min(
                self._waiting, key=lambda a: (self.service(a), self._waiting[a][0].seq)
            )
            head = self._waiting[account][0]
            if not self._fits(head.tokens):
                return  # head-of-line: the least-served account's request goes first
            self._waiting[account].popleft()
            if not self._waiting[account]:
                del self._waiting[account]
            self._depth -= 1
            if head.future.done():
                continue
            head.future.set_result(self._grant(account, head.tokens))

    def waited_s(self, waiter: _Waiter) -> float:
        return self.clock.now() - waiter.enqueued_at


def granted(future: asyncio.Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
