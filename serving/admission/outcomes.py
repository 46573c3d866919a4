"""Admission outcomes and the one table that maps them to HTTP responses.

Two families, as in the Gateway API Inference Extension's flow control:
- *rejected*: refused before queueing (bad key, over budget, queue full, draining, too long);
- *evicted*: queued or admitted, then dropped (deadline passed, client gone).
Each outcome's value is also its ``medgemma_admission_total{outcome}`` label.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import Enum


class Outcome(str, Enum):
    ADMITTED = "admitted"
    REJECTED_INVALID_KEY = "rejected_invalid_api_key"
    REJECTED_OVER_BUDGET = "rejected_concurrency_limit"
    REJECTED_QUEUE_FULL = "rejected_queue_full"
    REJECTED_DRAINING = "rejected_draining"
    REJECTED_CONTEXT_LENGTH = "rejected_context_length"
    REJECTED_LEDGER_UNAVAILABLE = "rejected_ledger_unavailable"
    EVICTED_QUEUE_TIMEOUT = "evicted_queue_timeout"
    EVICTED_CLIENT_GONE = "evicted_client_gone"


@dataclass(frozen=True)
class HttpError:
    status: int
    code: str
    type: str
    retry_after: bool  # whether the response carries Retry-After


# The single outcome -> HTTP mapping. A client disconnect gets no response at all.
HTTP_ERRORS: dict[Outcome, HttpError] = {
    Outcome.REJECTED_INVALID_KEY: HttpError(401, "invalid_api_key", "authentication_error", False),
    Outcome.REJECTED_OVER_BUDGET: HttpError(429, "concurrency_limit_exceeded", "rate_limit_error", True),
    Outcome.REJECTED_QUEUE_FULL: HttpError(503, "server_overloaded", "service_unavailable", True),
    Outcome.REJECTED_DRAINING: HttpError(503, "draining", "service_unavailable", True),
    Outcome.REJECTED_CONTEXT_LENGTH: HttpError(400, "context_length_exceeded", "invalid_request_error", False),
    Outcome.REJECTED_LEDGER_UNAVAILABLE: HttpError(503, "ledger_unavailable", "service_unavailable", True),
    Outcome.EVICTED_QUEUE_TIMEOUT: HttpError(503, "queue_timeout", "service_unavailable", True),
}


class AdmissionError(Exception):
    """A request that will not reach the engine; carries its outcome and what to tell the client."""

    def __init__(self, outcome: Outcome, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def evicted(self) -> bool:
        return self.outcome.value.startswith("evicted_")


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
