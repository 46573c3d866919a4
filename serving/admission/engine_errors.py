"""vLLM's error responses rewritten so every error a client sees has a stable string ``code``.

Guarantees:
- vLLM sends the HTTP status as a number in ``code``; the rewriter puts the matching string
  there (``ENGINE_ERROR_CODES``), in a plain error body and in a stream's error event; an
  engine failure is ``engine_unavailable`` and a 503 with ``Retry-After`` either way.
- A non-streaming error response is held until the app returns (or raises), then sent once,
  with a correct ``content-length``; a body that is not an OpenAI error (Starlette's plain
  500) becomes one; an exception vLLM let through becomes a 500 ``internal_error``, or a
  504 ``upstream_timeout`` for a remote image that did not answer.
- Nothing here holds admission state; an ``ErrorRewriter`` rewrites one response's messages.
"""

from __future__ import annotations

import msgspec

from serving.admission.outcomes import engine_error_code

SSE_ERROR_PREFIX = b'data: {"error"'
INTERNAL_ERROR_MESSAGE = "The server failed to handle this request; the x-request-id header identifies it."
UPSTREAM_TIMEOUT = {"error": {"message": "A remote image URL did not answer within the time limit.",
                               "type": "server_error", "param": None, "code": "upstream_timeout"}}  # fmt: skip


class ErrorRewriter:
    """Rewrites one response's messages on their way to the client (see the module)."""

    def __init__(self) -> None:
        self.started = False  # a response start has come from the app
        self.streaming = False
        self._held_start: dict | None = None  # a non-streaming error's start, held back
        self._held_body: list[bytes] = []
        self.error_code: str | None = None  # the code of the error the client got (in a stream too)

    def rewrite(self, message: dict) -> dict | None:
        """The message to send in place of ``message``; None while an error is held."""
        if self._held_start is None and message["type"] == "http.response.body":  # the hot path
            if self.streaming and message.get("body", b"").startswith(SSE_ERROR_PREFIX):
                body = normalised_sse_error(message["body"])
                self.error_code = _event_code(body)
                return {**message, "body": body}
            return message
        if message["type"] == "http.response.start":
            self.started = True
            self.streaming = any(
                k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers", ())
            )
            if message["status"] >= 400 and not self.streaming:
                self._held_start = message  # released by held_error(), once the app has returned
                return None
        elif self._held_start is not None:
            self._held_body.append(message.get("body", b""))
            return None
        return message

    def held_error(self, failure: BaseException | None) -> tuple[dict, bytes] | None:
        """Once the app has returned (or raised): the held error, normalised, or the error an
        exception stands for when no response had started; None when there is nothing to send."""
        if self._held_start is None and (failure is None or self.started):
            return None
        start = self._held_start or {"type": "http.response.start", "status": 500, "headers": []}
        body = b"".join(self._held_body)
        if isinstance(failure, TimeoutError):
            start, body = {**start, "status": 504}, msgspec.json.encode(UPSTREAM_TIMEOUT)
        self._held_start = None
        start, body = normalised_error(start, body)
        self.error_code = _event_code(b"data: " + body)
        return start, body


def _event_code(event: bytes) -> str | None:
    """The string ``code`` of an error event (``data: {"error": ...}``), if it has one."""
    try:
        code = msgspec.json.decode(event.partition(b"\n\n")[0][6:])["error"]["code"]
    except (msgspec.DecodeError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _string_code(error: dict, status: int) -> bool:
    """Give a vLLM error object a string ``code`` in place of its numeric one (an engine
    failure becomes ``engine_unavailable``); True if it changed."""
    if isinstance(error.get("code"), str):
        return False
    engine_failed = "EngineDead" in str(error.get("type")) or "EngineCore" in str(error.get("message"))
    error["code"] = "engine_unavailable" if engine_failed else engine_error_code(status)
    return True


def normalised_sse_error(chunk: bytes) -> bytes:
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


def normalised_error(start: dict, body: bytes) -> tuple[dict, bytes]:
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
