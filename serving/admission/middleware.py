"""The ASGI adapter that puts admission in front of vLLM's model endpoints, in-process.

A request's life, top to bottom in ``AdmissionMiddleware.__call__``: request id -> route ->
``controller.authenticate`` -> guard (body, JSON, media) -> priority class ->
``estimator.shape`` ->
``controller.decide`` (or ``controller.wait``, raced against the client leaving) ->
``_serve``: vLLM's app runs, progress is reported to the ``AdmittedRequest`` -> its ``end``.

Guarantees:
- Only ``POST /v1/chat/completions`` and ``POST /v1/completions`` are admitted. The
  operational paths (``PUBLIC_PATHS``) pass straight through; every other vLLM route
  answers 404 ``not_found``, so nothing reaches the engine around the budget.
- Every request gets an id (the client's ``x-request-id`` when it is a sane token, else a
  new one), returned in ``x-request-id`` and attached to our log lines.
- Every response from the model endpoints carries ``x-ratelimit-limit-concurrency`` and
  ``x-ratelimit-remaining-concurrency``; refusals are OpenAI-shaped (``outcomes``).
- The admitted request is ended exactly once, by whichever comes first: its last response
  chunk reached the client, the client disconnected (vLLM aborts its engine request on its
  own), the app returned or raised, or the server ended it (``controller.end_running`` /
  ``end_stalled``: then the client gets a clear error, or nothing if it stopped reading).
- A client that disconnects while queued leaves the queue and gets nothing.
- Each request runs in one priority class (``priority``: asked for with ``x-priority`` or the
  body's ``priority``, bounded by its key), named in the response's ``x-priority`` header;
  vLLM gets the class as the body's ``priority``, appended to the body as read, and
  preprocesses the request's images in class order (``preprocess``).
- vLLM's prefix cache is kept per account: a ``cache_salt`` made from the account (and the
  client's own salt) is appended the same way (``cache_scope``). Otherwise bodies are
  read once and replayed to vLLM unchanged, with the guard's parse of them, which vLLM
  takes instead of parsing them again (``handoff``); request content is never logged.
  vLLM's own errors get a string ``code`` (``engine_errors``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from serving.admission.cache_scope import FIELD as SALT_FIELD, account_salt
from serving.admission.controller import AdmissionController
from serving.admission.engine_errors import ErrorRewriter
from serving.admission.estimate import PromptEstimator, RequestShape
from serving.admission.guard import RequestGuard, count_images
from serving.admission.handoff import hand_over, with_fields
from serving.admission.inline_render import render_inline
from serving.admission.keys import Account
from serving.admission.outcomes import AdmissionError, Outcome, error_response
from serving.admission.preprocess import preprocess_rank
from serving.admission.priority import PRIORITY_HEADER, requested_class
from serving.admission.request import AdmittedRequest
from serving.logs import request_id_var
from serving.usage.engine_tokens import token_tally
from serving.usage.record import RequestUsage
from serving.usage.recorder import UsageRecorder

logger = logging.getLogger(__name__)

MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/v1/models", "/version", "/openapi.json"})
REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID_PATTERN = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
IMAGE_REFUSALS = frozenset({Outcome.REJECTED_IMAGE_URL, Outcome.REJECTED_IMAGE_TOO_LARGE, Outcome.REJECTED_INVALID_IMAGE,
                            Outcome.REJECTED_TOO_MANY_IMAGES, Outcome.REJECTED_UNSUPPORTED_MEDIA})  # fmt: skip
LIMIT_HEADER = "x-ratelimit-limit-concurrency"
REMAINING_HEADER = "x-ratelimit-remaining-concurrency"


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


def _bearer(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            return text[7:].strip() if text[:7].lower() == "bearer " else None
    return None


class AdmissionMiddleware:
    def __init__(self, app, controller: AdmissionController, estimator: PromptEstimator,
                 guard: RequestGuard | None = None, usage: UsageRecorder | None = None,
                 inline_max_bytes: int = 0):  # fmt: skip
        self.app = app
        self.inline_max_bytes = inline_max_bytes  # 0: no request renders inline (serving.admission.inline_render)
        self.controller = controller
        self.estimator = estimator
        self.guard = guard or RequestGuard()
        self.usage = usage or UsageRecorder(controller.metrics)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        rid = request_id(scope)
        request_id_var.set(rid.decode())
        send = _with_headers(send, [(REQUEST_ID_HEADER, rid)])
        path = scope["path"]
        if path in PUBLIC_PATHS or (path in MODEL_PATHS and scope["method"] != "POST"):
            await self.app(scope, receive, send)
            return
        usage = self.usage.start(rid.decode(), path if path in MODEL_PATHS else "other", arrived, scope)
        try:
            await self._handle(scope, receive, send, path, usage)
        finally:
            self.usage.finish(usage)  # exactly one record, whatever the end

    async def _handle(self, scope, receive, send, path: str, usage: RequestUsage) -> None:
        if path not in MODEL_PATHS:
            usage.refusal = AdmissionError(Outcome.REJECTED_NOT_FOUND, f"There is no {path} endpoint here.")
            self.controller.count(Outcome.REJECTED_NOT_FOUND)
            await _send_error(send, usage.refusal)
            return
        try:
            account = usage.account = self.controller.authenticate(_bearer(scope))
        except AdmissionError as error:
            usage.authenticated_at = time.monotonic()
            usage.refusal = error
            await _send_error(send, error, limit=0, remaining=0)
            return
        usage.authenticated_at = time.monotonic()
        try:
            body = await self.guard.read_body(scope, receive)
            if body is None:
                return  # the client left while sending its body
            parsed = self.guard.parse(body)
            usage.body_read(parsed, self.usage.served_models)
            usage.images, usage.image_pixels = await self.guard.check_images(parsed)
            priority = usage.priority = requested_class(scope, parsed, account.default_class, account.max_class)
        except AdmissionError as error:
            usage.refusal = error
            if error.outcome in IMAGE_REFUSALS:  # refused midway: the record still counts them
                usage.images = count_images(parsed)
            self.controller.count(error.outcome)
            await _send_error(send, error, account.plan.concurrency, await self.controller.remaining(account))
            return
        shape = await self.estimator.shape(path, parsed)
        shape.priority = priority
        preprocess_rank.set(priority.rank)  # vLLM preprocesses its images in class order
        render_inline.set(usage.images == 0 and len(body) <= self.inline_max_bytes)  # no renderer thread handoff
        token_tally.set(usage.tally)  # the engine's token counts land in the usage record
        fields = {"priority": priority.vllm_priority}  # vLLM schedules (and preempts) by class
        salt = account_salt(account.name, parsed.get(SALT_FIELD))
        if salt is not None:
            fields[SALT_FIELD] = salt  # this account's prefix cache (cache_scope)
        body = with_fields(body, fields)
        parsed.update(fields)  # as vLLM reads the appended keys
        hand_over(body, parsed)  # vLLM's FastAPI takes this parse instead of parsing again
        usage.deciding_at = time.monotonic()
        request = await self._admit(account, shape, receive, send, usage)
        if request is not None:
            self.usage.admitted(usage, request, scope)
            await self._serve(scope, body, receive, send, request, usage.arrived, shape.prompts)

    async def _admit(self, account: Account, shape: RequestShape, receive, send,
                     usage: RequestUsage) -> AdmittedRequest | None:  # fmt: skip
        try:
            return self.controller.decide(account, shape) or await self._wait(account, shape, receive)
        except AdmissionError as error:
            usage.refusal = error
            limit = account.plan.concurrency
            if error.outcome is Outcome.REJECTED_CONCURRENCY_LIMIT:
                remaining = 0
            else:
                remaining = await self.controller.remaining(account)
            await _send_error(send, error, limit, remaining)
            return None

    async def _wait(self, account: Account, shape: RequestShape, receive) -> AdmittedRequest | None:
        """The slow path (a ledger round trip or a queue), raced against the client leaving."""
        admit = asyncio.ensure_future(self.controller.wait(account, shape))
        gone = asyncio.ensure_future(_wait_disconnect(receive))
        await asyncio.wait({admit, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not gone.done():
            gone.cancel()
            return admit.result()
        admit.cancel()  # the client left (perhaps just as its turn came)
        try:
            request = await admit
        except (asyncio.CancelledError, AdmissionError):
            request = None  # wait() ended it
        if request is not None:
            await request.end(Outcome.EVICTED_CLIENT_GONE)
        logger.info("client left while queued")
        return None

    async def _serve(self, scope, body: bytes, receive, send, request: AdmittedRequest,
                     arrived: float, prompts: int = 1) -> None:  # fmt: skip
        headers = [(LIMIT_HEADER.encode(), str(request.limit).encode()),
                   (REMAINING_HEADER.encode(), str(request.remaining).encode()),
                   (PRIORITY_HEADER, request.priority.value.encode())]  # fmt: skip
        if request.ended:  # ended by the server (drain, engine failure) before it could run
            await _send_forced_end(send, request, headers)
            return

        async def report(message, held: bool = False) -> None:
            """vLLM's ``send``: its message, rewritten (``engine_errors``; ``held``: one the
            rewriter held back), to the client; progress and the end to the request's owner."""
            if not held:
                if request.forced_end:
                    return  # the app's late messages after the server ended the request
                message = rewriter.rewrite(message)
                if message is None:
                    return  # an error response, held until the app returns
            is_body = message["type"] == "http.response.body"
            if not is_body and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *headers]}
                request.response_started(message["status"], rewriter.streaming)
            request.sending(body=is_body and bool(message.get("body")))
            await send(message)
            request.sent()
            if is_body and not message.get("more_body", False):
                request.finished = True
                await request.end(Outcome.COMPLETED)
                _observe(self.controller.metrics, request, arrived)

        async def replay():
            """The already-read body once, then the client's own messages."""
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()
            if message["type"] == "http.disconnect":
                await request.end(Outcome.EVICTED_CLIENT_GONE)  # vLLM aborts on its own
            return message

        replayed = False
        rewriter = ErrorRewriter()
        ids = engine_request_ids(scope, request_id_var.get().encode(), prompts)
        if any(k == b"content-length" for k, _ in scope["headers"]):  # the body as replayed
            scope["headers"] = [*((k, v) for k, v in scope["headers"] if k != b"content-length"),
                                (b"content-length", str(len(body)).encode())]  # fmt: skip
        task = asyncio.ensure_future(self.app(scope, replay, report))
        request.serve(task, ids)
        failure: BaseException | None = None
        outcome = Outcome.COMPLETED  # the response ran to its end, whatever its status
        try:
            await task
        except asyncio.CancelledError:
            if not request.forced_end:
                outcome = Outcome.EVICTED_CLIENT_GONE  # the server cancelled our own task
                raise
            if request.outcome is not Outcome.EVICTED_CLIENT_STALLED:
                await _send_forced_end(send, request, headers)
        except Exception as exc:  # noqa: BLE001 - vLLM raised past its own handlers
            # Log the type only: exception messages and tracebacks can quote request content.
            failure = exc
            logger.error("request failed inside vLLM: %s (engine request %s)", type(exc).__name__, ids[0])
        finally:
            held = None if request.forced_end else rewriter.held_error(failure)
            if held is not None:
                await _send_held(report, *held)
            request.error_code = rewriter.error_code
            if not request.ended:
                await request.end(outcome)
            elif not request.released:  # a forced end in progress: its release completes first
                await request.wait_ended()
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("served: status %s, %d units, %s, %.3fs", request.status, request.units,
                             request.outcome.value, time.monotonic() - request.began)  # fmt: skip


def _observe(metrics, request: AdmittedRequest, arrived: float) -> None:
    """Client-seen latency of a request that ran to its end with a 2xx."""
    if request.first_body_at is None or not 200 <= (request.status or 0) < 300:
        return
    stream, priority = "true" if request.streaming else "false", request.priority.value
    metrics.request_ttft_seconds.labels(stream=stream, priority=priority).observe(request.first_body_at - arrived)
    metrics.request_e2e_seconds.labels(stream=stream, priority=priority).observe(time.monotonic() - arrived)
    if request.streaming and request.body_events > 2:  # the last event is "[DONE]"
        gaps = request.body_events - 2
        metrics.request_tpot_seconds.observe((request.last_body_at - request.first_body_at) / gaps)


async def _send_held(report, start: dict, body: bytes) -> None:
    """The error response the rewriter held back, sent like any response."""
    try:
        await report(start, held=True)
        await report({"type": "http.response.body", "body": body, "more_body": False}, held=True)
    except OSError:
        pass  # the client is gone


def _with_headers(send, extra: list[tuple[bytes, bytes]]):
    async def send_with_headers(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return send_with_headers


async def _send_forced_end(send, request: AdmittedRequest, headers) -> None:
    """The error a request the server ended gets: an SSE error event then ``[DONE]`` when
    its stream had started, else an error response; nothing once it had finished."""
    error = AdmissionError(request.outcome, request.end_message, retry_after_s=5)
    try:
        if request.finished:
            return
        if request.status is None:
            await _send_error(send, error, extra=headers)
        elif request.streaming:
            _, _, payload = error_response(error, {})
            event = b"data: " + payload + b"\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass  # the client is gone as well


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _send_error(send, error: AdmissionError, limit: int | None = None, remaining: int | None = None,
                      extra: list[tuple[bytes, bytes]] = ()) -> None:  # fmt: skip
    headers = {} if limit is None else {LIMIT_HEADER: str(limit), REMAINING_HEADER: str(remaining)}
    headers.update({k.decode(): v.decode() for k, v in extra})
    status, out_headers, payload = error_response(error, headers)
    logger.debug("refused: %s (%d)", error.outcome.value, status)
    await send({"type": "http.response.start", "status": status, "headers": out_headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
