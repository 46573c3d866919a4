"""One usage record per request: what it is made of, and what it never holds.

``RequestUsage`` is filled in by the admission middleware as a request goes (its account and
key id once authenticated, its class, model name, image count and pixels once its body was
checked, the refusal or the ``AdmittedRequest`` that served it, the engine's token counts);
``request_record`` turns it into the record (``usage-record.schema.json``, kind ``request``)
when the request has ended, whatever the end.

Guarantees:
- A record holds ids, names, counts, sizes and times only: never prompt text, image bytes,
  generated text, an API key or a key's full hash. The model name is copied only when it is
  one this server serves (anything else is ``other``: a client's free text never lands in
  a record); the request id is the validated ``x-request-id`` token.
- ``unit_seconds`` is units x (release - admission): what a concurrency plan consumed.
- Building a record is a handful of attribute reads (a few microseconds on the event loop);
  its time is formatted and it is serialised on the writer's thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from serving.admission.outcomes import HTTP_ERRORS, AdmissionError, Outcome, engine_error_code
from serving.usage.engine_tokens import TokenTally

if TYPE_CHECKING:
    from serving.admission.keys import Account
    from serving.admission.priority import PriorityClass
    from serving.admission.request import AdmittedRequest

RECORD_VERSION = 1
OTHER_MODEL = "other"
CLIENT_LEFT = frozenset({Outcome.EVICTED_CLIENT_GONE, Outcome.EVICTED_CLIENT_STALLED})


class RequestUsage:
    """What one request's record will say; the middleware fills it in as the request goes."""

    __slots__ = ("request_id", "endpoint", "arrived", "arrived_wall", "account", "priority", "model", "stream",
                 "images", "image_pixels", "tally", "refusal", "request", "authenticated_at", "deciding_at",
                 "spans")  # fmt: skip

    def __init__(self, request_id: str, endpoint: str, arrived: float):
        self.request_id = request_id
        self.endpoint = endpoint
        self.arrived = arrived  # monotonic
        self.arrived_wall = time.time() - (time.monotonic() - arrived)  # the wall time at ``arrived``
        self.account: Account | None = None
        self.priority: PriorityClass | None = None
        self.model: str | None = None
        self.stream = False
        self.images = 0
        self.image_pixels = 0
        self.tally = TokenTally()
        self.refusal: AdmissionError | None = None  # how it was refused, when it was
        self.request: AdmittedRequest | None = None  # what served it, when admitted
        self.authenticated_at: float | None = None  # its key was checked, accepted or not (monotonic)
        self.deciding_at: float | None = None  # checked and shaped: the admission decision began
        self.spans = None  # its trace spans, when tracing is on (``serving.usage.tracing``)

    def body_read(self, body: dict, served_models: frozenset[str]) -> None:
        """Model name (only a served one, else ``other``) and stream flag from the parsed body."""
        model = body.get("model")
        if isinstance(model, str):
            self.model = model if model in served_models else OTHER_MODEL
        self.stream = body.get("stream") is True


def request_record(usage: RequestUsage, replica: str, now: float | None = None) -> dict:
    """The usage record of a request that has ended (see the module docstring)."""
    now = time.monotonic() if now is None else now
    account, request = usage.account, usage.request
    units, unit_seconds, queue_wait, ttft = 0, 0.0, None, None
    if request is not None:
        outcome = request.outcome or Outcome.EVICTED_CLIENT_GONE  # not ended: its task was cancelled
        status, code = _status_and_code(request)
        units = request.units
        if request.admitted_at is not None:
            queue_wait = request.admitted_at - usage.arrived
            released = request.released_at if request.released_at is not None else now
            unit_seconds = units * max(0.0, released - request.admitted_at)
        if request.first_body_at is not None and status is not None and 200 <= status < 300:
            ttft = request.first_body_at - usage.arrived
    elif usage.refusal is not None:
        outcome = usage.refusal.outcome
        spec = HTTP_ERRORS[outcome]
        status, code = spec.status, spec.code
    else:
        outcome, status, code = Outcome.EVICTED_CLIENT_GONE, None, None  # it left before a decision
    tally = usage.tally
    return {
        "v": RECORD_VERSION,
        "kind": "request",
        "time": usage.arrived_wall + (now - usage.arrived),
        "request_id": usage.request_id,
        "account": account.name if account is not None else None,
        "key_id": account.key_id if account is not None else None,
        "plan": account.plan.name if account is not None else None,
        "priority": usage.priority.value if usage.priority is not None else None,
        "model": usage.model,
        "endpoint": usage.endpoint,
        "stream": usage.stream,
        "images": usage.images,
        "image_pixels": usage.image_pixels,
        "prompt_tokens": tally.prompt,
        "completion_tokens": tally.completion,
        "outcome": outcome.value,
        "status": status,
        "error_code": code,
        "queue_wait_s": queue_wait,
        "ttft_s": ttft,
        "e2e_s": now - usage.arrived,
        "units": units,
        "unit_seconds": unit_seconds,
        "client_left": outcome in CLIENT_LEFT,
        "replica": replica,
    }


def _status_and_code(request: AdmittedRequest) -> tuple[int | None, str | None]:
    """The status the client was sent and the error code its body carried: a stream that
    ended with an error event is a 200 with that event's code."""
    status = request.status
    spec = HTTP_ERRORS.get(request.outcome) if request.outcome is not None else None
    if spec is not None and request.outcome not in CLIENT_LEFT:  # the server ended it (drain, engine)
        return (spec.status if status is None else status), spec.code
    if request.error_code is not None:  # vLLM's error, as the client got it (an in-stream one too)
        return status, request.error_code
    if status is not None and status >= 400:
        return status, engine_error_code(status)
    return status, None
