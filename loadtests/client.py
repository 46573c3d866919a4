"""One streamed chat request, timed: what the client saw, never what the model said.

Definitions (also printed in every report):
- TTFT: from sending the request to the first chunk with non-empty ``delta.content``.
- E2E: from sending the request to the end of the stream.
- ITL: the gaps between consecutive content chunks.
- TPOT: (E2E - TTFT) / (output tokens - 1), with output tokens from the server's ``usage``.

A record's ``priority`` is the class the server says the request ran in (this project's
``x-priority`` response header), else the class the request asked for, else None.

Guarantees: no prompt or generated text is kept (only counts); an error response keeps its
status, its OpenAI ``code`` and a short message; a transport failure is an outcome, not an
exception.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import httpx

from loadtests.workload import PreparedRequest

ERROR_MESSAGE_CHARS = 200


@dataclass
class RequestRecord:
    index: int
    stage: int
    key: str
    images: int
    image_bytes: int
    request_bytes: int
    max_tokens: int
    scheduled_s: float | None  # open loop: when it should have been sent (from run start)
    start_s: float = 0.0  # when it was sent (from run start)
    ttft_s: float | None = None
    e2e_s: float | None = None
    status: int | None = None
    outcome: str = "pending"
    error_code: str | None = None
    error_message: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    content_chunks: int = 0
    itl_s: list[float] = field(default_factory=list)
    retry_after_s: float | None = None  # from a 429/503's Retry-After header
    in_window: bool = True
    priority: str | None = None  # the class it ran in (x-priority) or asked for
    stream: str | None = None  # its stream's name, in a streams stage

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def end_s(self) -> float:
        return self.start_s + (self.e2e_s or 0.0)

    def to_json(self) -> dict:
        data = asdict(self)
        data["tpot_s"] = self.tpot_s
        return data


def classify(status: int | None, code: str | None) -> str:
    """The outcome bucket of a response (``ok``, ``rate_limited`` and errors)."""
    if status is None:
        return "transport_error"
    if status == 200:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status == 503:
        return "overloaded"
    if status >= 500:
        return "server_error"
    return "client_error"


def _error_fields(payload: bytes) -> tuple[str | None, str | None]:
    try:
        error = json.loads(payload).get("error") or {}
    except (ValueError, AttributeError):
        return None, payload[:ERROR_MESSAGE_CHARS].decode("utf-8", "replace")
    code = error.get("code")
    return (str(code) if code is not None else error.get("type")), str(error.get("message", ""))[
        :ERROR_MESSAGE_CHARS
    ]


async def send(
    client: httpx.AsyncClient, url: str, request: PreparedRequest, record: RequestRecord, t0: float
) -> RequestRecord:
    """Send ``request`` and fill ``record``; ``t0`` is the run's start on ``perf_counter``."""
    started = time.perf_counter()
    record.start_s = started - t0
    last_chunk = None
    try:
        async with client.stream("POST", url, content=request.body, headers=request.headers) as response:
            record.status = response.status_code
            record.priority = response.headers.get("x-priority") or record.priority
            if response.status_code != 200:
                retry_after = response.headers.get("retry-after", "")
                record.retry_after_s = float(retry_after) if retry_after.isdigit() else None
                payload = await response.aread()
                record.error_code, record.error_message = _error_fields(payload)
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:  # an error event inside a 200 stream
                        record.error_code, record.error_message = _error_fields(line[6:].encode())
                        code = chunk["error"].get("code")
                        record.status = code if isinstance(code, int) and code >= 400 else 500
                        break
                    now = time.perf_counter()
                    choices = chunk.get("choices") or []
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        record.content_chunks += 1
                        if record.ttft_s is None:
                            record.ttft_s = now - started
                        else:
                            record.itl_s.append(now - last_chunk)
                        last_chunk = now
                    usage = chunk.get("usage")
                    if usage:
                        record.prompt_tokens = usage.get("prompt_tokens")
                        record.output_tokens = usage.get("completion_tokens")
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        record.status = None
        record.error_code = type(error).__name__
        record.error_message = str(error)[:ERROR_MESSAGE_CHARS]
    record.e2e_s = time.perf_counter() - started
    record.outcome = classify(record.status, record.error_code)
    return record
