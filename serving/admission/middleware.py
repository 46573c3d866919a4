"""ASGI middleware that puts admission in front of vLLM's model endpoints, in-process.

Guarantees:
- Only ``POST /v1/chat/completions`` and ``POST /v1/completions`` are admitted. The
  operational paths (``PUBLIC_PATHS``: health, readiness, metrics, model list, OpenAPI)
  pass straight through; every other vLLM route (``/v1/responses``, ``/v1/messages``,
  ``/inference/v1/generate``, ``/tokenize``, ...) answers 404 ``not_found``, so nothing
  reaches the engine around the budget.
- Every request gets an id (the client's ``x-request-id`` when it is a sane token, else a
  new one), returned in ``x-request-id`` and attached to our log lines.
- The request guard (``guard``) checks size, read time, JSON and images before admission.
- Every response from those endpoints carries ``x-ratelimit-limit-concurrency`` and
  ``x-ratelimit-remaining-concurrency``; refusals are OpenAI-shaped (``outcomes``).
- Units are released exactly once: when the response's last body chunk is sent (the last
  SSE event of a stream), when the client disconnects (vLLM aborts the engine request on
  its own), or when the app raises - whichever comes first.
- A client that disconnects while queued leaves the queue and gets nothing.
- A client that stops reading its response (its send blocked on back-pressure for the
  stall timeout) is ended like a disconnect: engine request aborted, units released.
  Memory per such client stays bounded by the transport's buffers meanwhile.
- Bodies are read once and replayed to vLLM unchanged; request content is never logged.
- vLLM's own error bodies get a string ``code`` (``ENGINE_ERROR_CODES``) in place of its
  numeric one, so every error a client sees carries a stable machine-readable code.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec

from serving.admission.controller import AdmissionController, Ticket
from serving.admission.estimate import PromptEstimator, RequestShape
from serving.admission.guard import RequestGuard
from serving.admission.keys import Account
from serving.admission.outcomes import (
    AdmissionError,
    Outcome,
    engine_error_code,
    error_response,
)
from serving.logs import request_id_var

logger = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 2.0  # a forced end never waits longer on the engine than this
MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/v1/models", "/version", "/openapi.json"})
REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID_PATTERN = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
LIMIT_HEADER = b"x-ratelimit-limit-concurrency"
REMAINING_HEADER = b"x-ratelimit-remaining-concurrency"


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
            return None
    return None


def _ratelimit_headers(limit: int, remaining: int) -> dict[str, str]:
    return {LIMIT_HEADER.decode(): str(limit), REMAINING_HEADER.decode(): str(remaining)}


def request_id(scope) -> bytes:
    """The client's ``x-request-id`` when it is a sane token, else a new id."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER and REQUEST_ID_PATTERN.fullmatch(value):
            return value
    return uuid.uuid4().hex.encode()


def engine_request_ids(scope, rid: bytes, prompts: int = 1) -> list[str]:
    """Gives vLLM a request id of our own making (``<rid>.<random>``: unique even when
    clients reuse theirs) through the header vLLM reads; returns vLLM's external ids for it,
    which ``abort`` takes: the request's own id first, then one per prompt of a batched
    completion (vLLM 0.32 names them ``cmpl-<id>-<i>``). ``abort`` also looks for any other
    id vLLM derived from the first (beam search's, a chat with several prompts)."""
    own = rid + b"." + uuid.uuid4().hex[:12].encode()
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k != REQUEST_ID_HEADER]
    scope["headers"].append((REQUEST_ID_HEADER, own))
    if scope["path"] == "/v1/chat/completions":
        return ["chatcmpl-" + own.decode()]
    base = "cmpl-" + own.decode()
    return [base, *(f"{base}-{i}" for i in range(prompts))]


class AdmissionMiddleware:
    def __init__(
        self,
        app,
        controller: AdmissionController,
        estimator: PromptEstimator,
        guard: RequestGuard | None = None,
        abort: Callable[[str], Awaitable[None]] | None = None,
    ):
        self.app = app
        self.controller = controller
        self.estimator = estimator
        self.guard = guard or RequestGuard()
        self.abort = abort  # aborts engine requests by vLLM's external request ids
        self._serving: set[_Serving] = set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        rid = request_id(scope)
        request_id_var.set(rid.decode())
        send = _with_header(send, REQUEST_ID_HEADER, rid)
        path = scope["path"]
        if path in PUBLIC_PATHS or (path in MODEL_PATHS and scope["method"] != "POST"):
            await self.app(scope, receive, send)
            return
        if path not in MODEL_PATHS:
            self.controller.count(Outcome.REJECTED_NOT_FOUND)
            error = AdmissionError(Outcome.REJECTED_NOT_FOUND, f"There is no {path} endpoint here.")
            await _send_error(send, error, {})
            return
        try:
            account = self.controller.authenticate(_bearer(scope))
        except AdmissionError as error:
            await _send_error(send, error, _ratelimit_headers(0, 0))
            return
        try:
            body = await self.guard.read_body(scope, receive)
            if body is None:
                return  # the client left while sending its body
            parsed = self.guard.parse(body)
            await self.guard.check_images(parsed)
        except AdmissionError as error:
            self.controller.count(error.outcome)
            limit = account.plan.concurrency
            remaining = max(0, limit - await self.controller.ledger.inflight(account.name))
            await _send_error(send, error, _ratelimit_headers(limit, remaining))
            return
        shape = await self.estimator.shape(path, parsed)
        ticket = await self._admit(account, shape, receive, send)
        if ticket is None:
            return
        await self._serve(scope, body, receive, send, ticket, arrived, shape.prompts)

    async def _admit(self, account: Account, shape: RequestShape, receive, send) -> Ticket | None:
        try:
            ticket = self.controller.admit_now(account, shape)
            if ticket is None:
                ticket = await self._admit_waiting(account, shape, receive)
            return ticket
        except AdmissionError as error:
            limit = account.plan.concurrency
            remaining = 0 if error.outcome is Outcome.REJECTED_OVER_BUDGET else None
            if remaining is None:
                remaining = max(0, limit - await self.controller.ledger.inflight(account.name))
            await _send_error(send, error, _ratelimit_headers(limit, remaining))
            return None

    async def _admit_waiting(self, account: Account, shape: RequestShape, receive) -> Ticket | None:
        """The slow path (a ledger round trip or a queue): watches for the client leaving."""
        admit = asyncio.ensure_future(self.controller.admit(account, shape))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        await asyncio.wait({admit, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not gone.done():
            gone.cancel()
            return admit.result()
        admit.cancel()  # the client left (perhaps just as its turn came)
        try:
            ticket = await admit
        except (asyncio.CancelledError, AdmissionError):
            ticket = None
        if ticket is not None:
            await ticket.release()
        logger.info("client left while queued")
        return None

    async def _serve(self, scope, body: bytes, receive, send, ticket: Ticket, arrived: float | None = None,
                     prompts: int = 1) -> None:  # fmt: skip
        receive_wrapper = _replay(body, receive, on_disconnect=ticket.release)
        headers = [
            (LIMIT_HEADER, str(ticket.limit).encode()),
            (REMAINING_HEADER, str(ticket.remaining).encode()),
        ]
        serving = _Serving()
        serving.engine_request_ids = engine_request_ids(scope, request_id_var.get().encode(), prompts)

        async def send_wrapper(message):
            if serving.ended_by_server:
                return  # the app's late messages after a forced end
            if message["type"] == "http.response.start":
                serving.started = True
                serving.status = message["status"]
                serving.streaming = any(
                    k == b"content-type" and v.startswith(b"text/event-stream")
                    for k, v in message.get("headers", ())
                )
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *headers]
                if message["status"] >= 400 and not serving.streaming:
                    serving.error_start = message  # held until its body has a string code
                    return
            if serving.error_start is not None and message["type"] == "http.response.body":
                serving.error_body.append(message.get("body", b""))
                return  # sent once the app has returned (or raised): see _send_held_error
            if serving.streaming and message.get("body", b"").startswith(SSE_ERROR_PREFIX):
                message = {**message, "body": _normalised_sse_error(message["body"])}
            serving.send_since = time.monotonic()  # cleared once the client took it
            if message["type"] == "http.response.body" and message.get("body"):
                serving.body_sent(serving.send_since)
            await send(message)
            serving.send_since = None
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                serving.finished = True
                await ticket.release()
                self._observe(serving, arrived)

        serving.task = asyncio.ensure_future(self.app(scope, receive_wrapper, send_wrapper))
        self._serving.add(serving)
        failure: Exception | None = None
        try:
            await serving.task
        except asyncio.CancelledError:
            if not serving.ended_by_server:
                raise
            # Cancelling the app does not always reach vLLM's generator (a stream blocked
            # in send holds it suspended outside), so abort the engine request by its id.
            await self._abort(serving)
            if not serving.stalled:
                await _send_forced_end(send, serving, headers)
        except Exception as exc:  # noqa: BLE001 - vLLM raised past its own handlers
            # Log the type only: exception messages and tracebacks can quote request content.
            failure = exc
            logger.error("request failed inside vLLM: %s (engine request %s)", type(exc).__name__,
                         serving.engine_request_ids[0])  # fmt: skip
        finally:
            if serving.error_start is not None or (failure is not None and not serving.started):
                await _send_held_error(send, serving, headers, failure)
            self._serving.discard(serving)
            await ticket.release()
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "served: status %s, %d units, %s, %.3fs",
                    serving.status,
                    ticket.lease.units,
                    serving.ended_by_server and "ended by the server" or "ran to its end",
                    time.monotonic() - serving.began,
                )

    def _observe(self, serving: _Serving, arrived: float | None) -> None:
        """Client-seen latency of a request that ran to its end with a 2xx."""
        if arrived is None or serving.first_body_at is None or not 200 <= (serving.status or 0) < 300:
            return
        metrics = self.controller.metrics
        stream = "true" if serving.streaming else "false"
        metrics.request_ttft_seconds.labels(stream=stream).observe(serving.first_body_at - arrived)
        metrics.request_e2e_seconds.labels(stream=stream).observe(time.monotonic() - arrived)
        if serving.streaming and serving.body_events > 2:  # the last event is "[DONE]"
            gaps = serving.body_events - 2
            metrics.request_tpot_seconds.observe((serving.last_body_at - serving.first_body_at) / gaps)

    @property
    def serving_count(self) -> int:
        return len(self._serving)

    async def end_all(self, message: str, outcome: Outcome = Outcome.REJECTED_DRAINING) -> None:
        """End every running request now (drain's grace period is over, or the engine
        failed): its engine request is aborted, the client gets a clear error (``outcome``'s
        code), its units are released."""
        for serving in list(self._serving):
            serving.ended_by_server = message
            serving.ended_outcome = outcome
            serving.task.cancel()
        while self._serving:
            await asyncio.sleep(0.01)

    async def _abort(self, serving: _Serving) -> None:
        if self.abort is None or not serving.engine_request_ids:
            return
        if serving.ended_outcome is Outcome.EVICTED_ENGINE_FAILED:
            return  # nothing to abort in a dead or hung engine, and it would not answer
        try:
            await asyncio.wait_for(self.abort(serving.engine_request_ids), ABORT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the engine may be gone already
            logger.warning("could not abort engine request %s", serving.engine_request_ids[0], exc_info=True)

    def end_stalled(self, stall_timeout_s: float, now: float | None = None) -> int:
        """End requests whose client has not taken a response chunk for ``stall_timeout_s``
        (it stopped reading; the send is blocked on back-pressure): the engine request is
        aborted and the units released, so a client that never reads cannot hold them."""
        now = time.monotonic() if now is None else now
        ended = 0
        for serving in list(self._serving):
            since = serving.send_since
            if since is not None and now - since > stall_timeout_s and not serving.ended_by_server:
                serving.ended_by_server = "The client stopped reading its response."
                serving.stalled = True
                serving.task.cancel()
                ended += 1
        if ended:
            logger.warning("ended %d requests whose clients stopped reading for %.0fs", ended, stall_timeout_s)
        return ended

    async def watch_stalled(self, stall_timeout_s: float, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.end_stalled(stall_timeout_s)


class _Serving:
    """One request being served: what a forced end (drain, engine failure, a stalled
    client) and the error normalisation need to know of it."""

    def __init__(self) -> None:
        self.task: asyncio.Future | None = None
        self.started = False
        self.began = time.monotonic()
        self.status: int | None = None
        self.streaming = False
        self.finished = False
        self.ended_by_server: str | None = None
        self.engine_request_ids: list[str] = []  # vLLM's external ids, for abort
        self.ended_outcome = Outcome.REJECTED_DRAINING
        self.stalled = False  # ended because the client stopped reading: send it nothing
        self.send_since: float | None = None  # when the pending send began
        self.error_start: dict | None = None  # an error response's start, held back
        self.error_body: list[bytes] = []
        self.first_body_at: float | None = None  # client-seen latency (metrics)
        self.last_body_at: float | None = None
        self.body_events = 0

    def body_sent(self, now: float) -> None:
        if self.first_body_at is None:
            self.first_body_at = now
        self.last_body_at = now
        self.body_events += 1


SSE_ERROR_PREFIX = b'data: {"error"'


def _string_code(error: dict, status: int) -> bool:
    """Give a vLLM error object a string ``code`` in place of its numeric one (an engine
    failure becomes ``engine_unavailable``); True if it changed."""
    if isinstance(error.get("code"), str):
        return False
    engine_dead = "EngineDead" in str(error.get("type")) or "EngineCore" in str(error.get("message"))
    error["code"] = "engine_unavailable" if engine_dead else engine_error_code(status)
    return True


def _normalised_sse_error(chunk: bytes) -> bytes:
    """vLLM's in-stream error event with a string ``code``."""
    event, sep, rest = chunk.partition(b"\n\n")
    try:
        payload = msgspec.json.decode(event[6:])
        error = payload["error"]
        status = error.get("code") if isinstance(error.get("code"), int) else 500
        if _string_code(error, status):
            return b"data: " + msgspec.json.encode(payload) + sep + rest
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        pass
    return chunk


INTERNAL_ERROR_MESSAGE = "The server failed to handle this request; the x-request-id header identifies it."


def _normalised_error(start: dict, body: bytes) -> tuple[dict, bytes]:
    """vLLM's error body with a string ``code`` (it sends the HTTP status as a number);
    a body that is not an OpenAI error (Starlette's plain-text 500) becomes one."""
    status = start["status"]
    try:
        payload = msgspec.json.decode(body)
        _string_code(payload["error"], status)
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        message = INTERNAL_ERROR_MESSAGE if status >= 500 else "The request failed."
        payload = {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                             "param": None, "code": engine_error_code(status)}}  # fmt: skip
    body = msgspec.json.encode(payload)
    headers = [(k, v) for k, v in start.get("headers", ()) if k not in (b"content-length", b"content-type")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if payload["error"].get("code") == "engine_unavailable":  # vLLM sends a dead engine as a 500
        status = 503
        headers.append((b"retry-after", b"10"))
    return {**start, "status": status, "headers": headers}, body


UPSTREAM_TIMEOUT = {"error": {"message": "A remote image URL did not answer within the time limit.",
                               "type": "server_error", "param": None, "code": "upstream_timeout"}}  # fmt: skip


async def _send_held_error(send, serving: _Serving, headers, failure: Exception | None) -> None:
    """The error response held back by send_wrapper, normalised; Starlette's generic 500
    for an exception vLLM let through becomes what it was, where we know (a timeout)."""
    start = serving.error_start or {"type": "http.response.start", "status": 500, "headers": headers}
    body = b"".join(serving.error_body)
    if isinstance(failure, TimeoutError):
        start, body = {**start, "status": 504}, msgspec.json.encode(UPSTREAM_TIMEOUT)
    start, body = _normalised_error(start, body)
    try:
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except OSError:
        pass  # the client is gone
    serving.finished = True


def _with_header(send, name: bytes, value: bytes):
    async def send_with_header(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), (name, value)]}
        await send(message)

    return send_with_header


async def _send_forced_end(send, serving: _Serving, headers) -> None:
    error = AdmissionError(serving.ended_outcome, serving.ended_by_server or "", retry_after_s=5)
    try:
        if serving.finished:
            return
        if not serving.started:
            await _send_error(send, error, {k.decode(): v.decode() for k, v in headers})
            return
        if serving.streaming:
            _, _, payload = error_response(error, {})
            event = b"data: " + payload + b"\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass  # the client is gone as well


def _replay(body: bytes, receive, on_disconnect=None):
    """A ``receive`` that hands the already-read body over once, then passes through."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        message = await receive()
        if on_disconnect is not None and message["type"] == "http.disconnect":
            await on_disconnect()
        return message

    return replay


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _send_error(send, error: AdmissionError, headers: dict[str, str]) -> None:
    status, out_headers, payload = error_response(error, headers)
    logger.debug("refused: %s (%d)", error.outcome.value, status)
    await send({"type": "http.response.start", "status": status, "headers": out_headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
