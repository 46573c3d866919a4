"""Admission outcomes and the one table that maps them to HTTP responses.

Two families of failure, as in the Gateway API Inference Extension's flow control:
- *rejected*: refused before queueing (bad key, over budget, queue full, draining, too long);
- *evicted*: queued or admitted, then dropped (deadline passed, client gone or stalled,
  drain's grace over, engine failed).
``admitted`` and ``completed`` are the two successes. Each value is also its metric label
(``medgemma_admission_total{outcome}`` counts the admission decisions). Every end of an
admitted request carries one of these (``AdmittedRequest.end``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import Enum


class Outcome(str, Enum):
    ADMITTED = "admitted"
    COMPLETED = "completed"  # an admitted request's response ran to its end (any status)
    REJECTED_INVALID_KEY = "rejected_invalid_api_key"
    REJECTED_CONCURRENCY_LIMIT = "rejected_concurrency_limit"
    REJECTED_QUEUE_FULL = "rejected_queue_full"
    REJECTED_DRAINING = "rejected_draining"
    REJECTED_CONTEXT_LENGTH = "rejected_context_length"
    REJECTED_LEDGER_UNAVAILABLE = "rejected_ledger_unavailable"
    REJECTED_EXCEEDS_PLAN = "rejected_exceeds_plan"
    REJECTED_BODY_TOO_LARGE = "rejected_body_too_large"
    REJECTED_BODY_TIMEOUT = "rejected_body_timeout"
    REJECTED_INVALID_JSON = "rejected_invalid_json"
    REJECTED_INVALID_IMAGE = "rejected_invalid_image"
    REJECTED_IMAGE_TOO_LARGE = "rejected_image_too_large"
    REJECTED_IMAGE_URL = "rejected_image_url"
    REJECTED_UNSUPPORTED_MEDIA = "rejected_unsupported_media"
    REJECTED_TOO_MANY_IMAGES = "rejected_too_many_images"
    REJECTED_NOT_FOUND = "rejected_not_found"
    REJECTED_INVALID_PRIORITY = "rejected_invalid_priority"
    REJECTED_PRIORITY_NOT_ALLOWED = "rejected_priority_not_allowed"
    REJECTED_ENGINE_FAILED = "rejected_engine_failed"
    EVICTED_QUEUE_TIMEOUT = "evicted_queue_timeout"
    EVICTED_CLIENT_GONE = "evicted_client_gone"
    EVICTED_CLIENT_STALLED = "evicted_client_stalled"  # it stopped reading its response
    EVICTED_DRAINED = "evicted_drained"  # still running when the drain's grace ran out
    EVICTED_ENGINE_FAILED = "evicted_engine_failed"


@dataclass(frozen=True)
class HttpError:
    status: int
    code: str
    type: str
    retry_after: bool  # whether the response carries Retry-After


# The single outcome -> HTTP mapping. A client that left or stopped reading is sent nothing.
HTTP_ERRORS: dict[Outcome, HttpError] = {
    Outcome.REJECTED_INVALID_KEY: HttpError(401, "invalid_api_key", "authentication_error", False),
    Outcome.REJECTED_CONCURRENCY_LIMIT: HttpError(429, "concurrency_limit_exceeded", "rate_limit_error", True),
    Outcome.REJECTED_QUEUE_FULL: HttpError(503, "server_overloaded", "service_unavailable", True),
    Outcome.REJECTED_DRAINING: HttpError(503, "draining", "service_unavailable", True),
    Outcome.REJECTED_CONTEXT_LENGTH: HttpError(400, "context_length_exceeded", "invalid_request_error", False),
    Outcome.REJECTED_LEDGER_UNAVAILABLE: HttpError(503, "ledger_unavailable", "service_unavailable", True),
    Outcome.REJECTED_EXCEEDS_PLAN: HttpError(400, "request_exceeds_plan", "invalid_request_error", False),
    Outcome.REJECTED_BODY_TOO_LARGE: HttpError(413, "request_too_large", "invalid_request_error", False),
    Outcome.REJECTED_BODY_TIMEOUT: HttpError(408, "request_timeout", "invalid_request_error", False),
    Outcome.REJECTED_INVALID_JSON: HttpError(400, "invalid_json", "invalid_request_error", False),
    Outcome.REJECTED_INVALID_IMAGE: HttpError(400, "invalid_image", "invalid_request_error", False),
    Outcome.REJECTED_IMAGE_TOO_LARGE: HttpError(400, "image_too_large", "invalid_request_error", False),
    Outcome.REJECTED_IMAGE_URL: HttpError(400, "image_url_not_allowed", "invalid_request_error", False),
    Outcome.REJECTED_UNSUPPORTED_MEDIA: HttpError(400, "unsupported_media", "invalid_request_error", False),
    Outcome.REJECTED_TOO_MANY_IMAGES: HttpError(400, "too_many_images", "invalid_request_error", False),
    Outcome.REJECTED_NOT_FOUND: HttpError(404, "not_found", "invalid_request_error", False),
    Outcome.REJECTED_INVALID_PRIORITY: HttpError(400, "invalid_priority", "invalid_request_error", False),
    Outcome.REJECTED_PRIORITY_NOT_ALLOWED: HttpError(403, "priority_not_allowed", "permission_error", False),
    Outcome.REJECTED_ENGINE_FAILED: HttpError(503, "engine_unavailable", "service_unavailable", True),
    Outcome.EVICTED_ENGINE_FAILED: HttpError(503, "engine_unavailable", "service_unavailable", True),
    Outcome.EVICTED_QUEUE_TIMEOUT: HttpError(503, "queue_timeout", "service_unavailable", True),
    Outcome.EVICTED_DRAINED: HttpError(503, "draining", "service_unavailable", True),
}


class AdmissionError(Exception):
    """A request that will not reach the engine; carries its outcome and what to tell the client."""

    def __init__(self, outcome: Outcome, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.retry_after_s = retry_after_s


def error_response(
    error: AdmissionError, headers: dict[str, str] | None = None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and OpenAI-shaped body for ``error`` (outcome -> HTTP, in one place)."""
    spec = HTTP_ERRORS[error.outcome]
    body = json.dumps(
        {"error": {"message": error.message, "type": spec.type, "param": None, "code": spec.code}}
    ).encode()
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if spec.retry_after:
        seconds = max(1, math.ceil(error.retry_after_s or 1))
        out.append((b"retry-after", str(seconds).encode()))
    for name, value in (headers or {}).items():
        out.append((name.encode(), value.encode()))
    return spec.status, out, body


# vLLM's own errors (validation, unknown model, engine failures) carry the HTTP status as
# a number in ``code``; ``engine_errors`` puts the matching string here in its place.
ENGINE_ERROR_CODES: dict[int, str] = {
    400: "invalid_request",
    404: "model_not_found",
    422: "image_fetch_failed",  # vLLM: a media URL answered 4xx or was malformed
    500: "internal_error",
    501: "not_implemented",
    503: "engine_unavailable",
}


def engine_error_code(status: int) -> str:
    return ENGINE_ERROR_CODES.get(status, f"http_{status}")
