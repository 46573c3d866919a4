"""One admitted request: the single owner of what it holds, and its one way to end.

Guarantees:
- An ``AdmittedRequest`` holds the account's units (its ledger lease), its engine slot, the
  engine request ids vLLM runs for it, and its progress (response started, bytes sent,
  client-seen latency). Nothing else holds them.
- Its states are explicit: ``QUEUED`` (waiting for its plan's budget or an engine slot),
  ``ADMITTED`` (holds both; vLLM has it), ``STREAMING`` (the response has started),
  ``ENDED``.
- ``end(outcome)`` is its only way to end and every trigger calls it: the last response
  chunk (``COMPLETED``), the client leaving (``EVICTED_CLIENT_GONE``), a client that stopped
  reading (``EVICTED_CLIENT_STALLED``), a drain's grace running out (``EVICTED_DRAINED``),
  the engine failing (``EVICTED_ENGINE_FAILED``), a refusal while queued. The first call
  wins and its outcome stands; later calls are no-ops. It releases the units and the slot
  exactly once, and runs to completion even when its caller is cancelled.
- An end the server forces on a running request (stall, drain, engine failure) cancels the
  vLLM app's task and aborts the engine requests (not a dead engine's) before the units
  are released, so the engine never runs more than admission granted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TYPE_CHECKING

from serving.admission.outcomes import Outcome
from serving.admission.priority import PriorityClass

if TYPE_CHECKING:
    from serving.admission.keys import Account
    from serving.admission.ledger import Lease
    from serving.admission.queue import Slot

logger = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 2.0  # a forced end never waits longer on the engine than this
# Ends the server forces on a running request: the vLLM app is cancelled, the engine aborted.
FORCED_ENDS = frozenset({Outcome.EVICTED_CLIENT_STALLED, Outcome.EVICTED_DRAINED, Outcome.EVICTED_ENGINE_FAILED})
_ENDING: set[asyncio.Task] = set()  # ends in flight, referenced until done


def _forces(outcome: Outcome) -> bool:
    """``outcome in FORCED_ENDS``, by identity (cheaper than hashing an enum member)."""
    return (outcome is Outcome.EVICTED_CLIENT_STALLED or outcome is Outcome.EVICTED_DRAINED
            or outcome is Outcome.EVICTED_ENGINE_FAILED)  # fmt: skip


class RequestState(str, Enum):
    QUEUED = "queued"
    ADMITTED = "admitted"
    STREAMING = "streaming"
    ENDED = "ended"


class AdmittedRequest:
    """Created by the admission controller (``decide``/``wait``); ended through ``end``."""

    __slots__ = ("account", "units", "kv_tokens", "priority", "state", "outcome", "forced_end", "end_message", "lease", "slot",
                 "inflight_after", "engine_request_ids", "_release", "_abort", "_task", "_released", "_ended",
                 "began", "budget_at", "admitted_at", "released_at", "status", "error_code", "streaming", "finished", "send_since", "first_body_at", "last_body_at",
                 "body_events", "__weakref__")  # fmt: skip

    def __init__(self, account: Account, units: int, tokens: int,
                 release: Callable[[AdmittedRequest], Awaitable[None] | None],
                 abort: Callable[[list[str]], Awaitable[None]] | None = None,
                 priority: PriorityClass = PriorityClass.INTERACTIVE):  # fmt: skip
        self.account = account
        self.units = units  # concurrency units charged (model cost x engine requests)
        self.kv_tokens = tokens  # estimated KV-cache tokens the slot accounts for
        self.priority = priority  # its class: which engine slots it may use
        self.state = RequestState.QUEUED
        self.outcome: Outcome | None = None  # how it ended; the first end stands
        self.forced_end = False  # the server ended it while it ran (stall, drain, engine failure)
        self.end_message = ""  # what a forced end tells the client
        self.lease: Lease | None = None
        self.slot: Slot | None = None
        self.inflight_after = 0  # the account's units in use right after admission
        self.engine_request_ids: list[str] = []  # vLLM's external ids, for abort
        self._release = release  # the controller's: frees lease and slot
        self._abort = abort
        self._task: asyncio.Future | None = None  # the vLLM app serving it
        self._released = False  # its end has released everything
        self._ended: asyncio.Event | None = None  # made only for a caller that must wait
        # progress: what the stall watch and client-seen latency read
        self.began = time.monotonic()
        self.budget_at: float | None = None  # when its plan's budget granted its units
        self.admitted_at: float | None = None  # when it got its units and slot
        self.released_at: float | None = None  # when its end began releasing them
        self.status: int | None = None
        self.error_code: str | None = None  # the error the client got from vLLM (in a stream too)
        self.streaming = False
        self.finished = False  # the response's last chunk reached the client
        self.send_since: float | None = None  # when the send in progress began
        self.first_body_at: float | None = None
        self.last_body_at: float | None = None
        self.body_events = 0

    # --- what it holds ------------------------------------------------------------------
    @property
    def limit(self) -> int:
        return self.account.plan.concurrency

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.inflight_after)

    @property
    def ended(self) -> bool:
        return self.state is RequestState.ENDED

    @property
    def released(self) -> bool:
        """Its end has released everything it held."""
        return self._released

    def admitted(self, lease: Lease, slot: Slot, inflight_after: int) -> None:
        self.lease, self.slot, self.inflight_after = lease, slot, inflight_after
        self.state = RequestState.ADMITTED
        self.admitted_at = time.monotonic()
        if self.budget_at is None:
            self.budget_at = self.admitted_at  # budget and slot in one step

    def serve(self, task: asyncio.Future, engine_request_ids: list[str]) -> None:
        """The vLLM app now serves it, under these engine request ids."""
        self._task = task
        self.engine_request_ids = engine_request_ids

    # --- progress (reported by the ASGI adapter) --------------------------------------
    def response_started(self, status: int, streaming: bool) -> None:
        self.status, self.streaming = status, streaming
        if self.state is RequestState.ADMITTED:
            self.state = RequestState.STREAMING

    def sending(self, body: bool) -> None:
        now = self.send_since = time.monotonic()
        if body:
            if self.first_body_at is None:
                self.first_body_at = now
            self.last_body_at = now
            self.body_events += 1

    def sent(self) -> None:
        self.send_since = None

    def stalled_s(self, now: float) -> float:
        """How long the send in progress has waited for the client (0 when none waits)."""
        return 0.0 if self.send_since is None else now - self.send_since

    # --- the end --------------------------------------------------------------------------
    async def end(self, outcome: Outcome, message: str = "") -> bool:
        """End the request with ``outcome``: releases all it holds, once. True if this call
        ended it; False if it had already ended (the first outcome stands)."""
        if self.state is RequestState.ENDED:
            await self.wait_ended()
            return False
        self.state = RequestState.ENDED
        self.outcome, self.end_message = outcome, message
        self.released_at = time.monotonic()  # what usage records charge units up to
        task = self._task
        if task is not None and _forces(outcome) and not task.done():
            self.forced_end = True
            work = self._force(outcome)
        else:
            pending = self._release(self)
            if pending is None:  # released without suspending: the common case
                self._released = True
                return True
            work = self._release_then_set(pending)
        ending = asyncio.ensure_future(work)
        _ENDING.add(ending)
        ending.add_done_callback(_ENDING.discard)
        await asyncio.shield(ending)  # completes even if the caller is cancelled meanwhile
        return True

    async def wait_ended(self) -> None:
        """Until the end's release has completed."""
        if self._released:
            return
        if self._ended is None:
            self._ended = asyncio.Event()
        await self._ended.wait()

    async def _force(self, outcome: Outcome) -> None:
        # Cancelling the app does not always reach vLLM's generator (a stream blocked in
        # send holds it suspended outside), so the engine requests are aborted by id too.
        self._task.cancel()
        if outcome is not Outcome.EVICTED_ENGINE_FAILED:  # a dead engine would not answer
            await self._abort_engine()
        await self._release_then_set(self._release(self))

    async def _release_then_set(self, pending: Awaitable[None] | None) -> None:
        try:
            if pending is not None:
                await pending
        finally:
            self._released = True
            if self._ended is not None:
                self._ended.set()

    async def _abort_engine(self) -> None:
        if self._abort is None or not self.engine_request_ids:
            return
        try:
            await asyncio.wait_for(self._abort(self.engine_request_ids), ABORT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the engine may be gone already
            logger.warning("could not abort engine request %s", self.engine_request_ids[0], exc_info=True)
