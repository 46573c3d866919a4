"""vLLM reuses the guard's parse of a request body instead of parsing the bytes again.

FastAPI parses a route's JSON body with ``json.loads`` as ``starlette.requests`` names it
(``Request.json``). The guard has parsed the same bytes already (msgspec), and for a body of
megabytes that second parse is dear: 6.7 ms of CPU for the 7.1 MB body of a 3000x3000 PNG
on the dev machine (docs/images.md, "The body is parsed once"). ``install`` gives
Starlette's request module a ``json`` whose ``loads`` returns the object the admission
middleware handed over for the request being served (``hand_over``, a context variable the
vLLM app's task inherits), when the bytes are equal to the ones handed over; any other call
is ``json.loads`` unchanged.

Why vLLM sees what it would have parsed: the guard refuses every body msgspec cannot decode
(``invalid_json``: among them all that ``json.loads`` reads differently from the JSON
standard: NaN, Infinity, numbers beyond a double, lone surrogates, a byte-order mark,
UTF-16), and wherever msgspec decodes a body it gives the same objects as ``json.loads``
(integers of any size, floats, escapes, a repeated key's last value:
``tests/unit/admission/test_handoff.py``). The fields the middleware appends to the body
(``priority``, ``cache_salt``) are set on the object the way a parser reads the appended
keys (``with_fields``).

Guarantees: a handed parse is used at most once, for equal bytes only, and only within the
request it was handed over for (the context of its task and of the tasks it starts); the
middleware does not read the object after handing it over (vLLM's validators may mutate
it); a Starlette whose request module has no ``json`` of the standard library is left alone,
with a warning, and every body is then parsed twice as before.
"""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any

logger = logging.getLogger(__name__)

# [body, parse] while unused, [] once used: a list, so that the one use empties it for
# every context that holds it (a task's context is a copy; setting the variable in one
# would leave the others holding the parse)
_handed: contextvars.ContextVar[list | tuple] = contextvars.ContextVar("handed_body", default=())


def hand_over(body: bytes, parsed: Any) -> None:
    """The body vLLM is about to read, and its parse; set in the request's context before
    its vLLM task is created."""
    _handed.set([body, parsed])


class HandedJson:
    """The ``json`` Starlette's request module sees: the standard module, but for ``loads``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(json, name)

    @staticmethod
    def loads(text: str | bytes | bytearray, **kwargs) -> Any:
        handed = _handed.get()
        if handed and not kwargs:
            body, parsed = handed
            if text == body:  # bytes compare their lengths first
                handed.clear()  # once, in every context: a second parse gets its own objects
                return parsed
        return json.loads(text, **kwargs)


def install() -> bool:
    """Route Starlette's request body parsing through ``HandedJson``; True when it is (or
    already was)."""
    import starlette.requests as requests

    current = getattr(requests, "json", None)
    if isinstance(current, HandedJson):
        return True
    if current is not json:
        logger.warning("request bodies are parsed twice: this Starlette's request module has no standard json")
        return False
    requests.json = HandedJson()
    return True


def with_fields(body: bytes, fields: dict[str, Any]) -> bytes:
    """``body`` (a JSON object) with ``fields`` set, without decoding it again: they are
    appended last, and JSON parsers (Python's, vLLM's, msgspec's) take a repeated key's last
    value, so each also overrides the field of that name the client sent."""
    end = _end_of_content(body, len(body))
    if end == 0 or body[end - 1] != CLOSE:
        raise ValueError("not a JSON object")
    if not fields:
        return body
    inner = _end_of_content(body, end - 1)
    sep = b"" if inner and body[inner - 1] == OPEN else b","
    added = b",".join(json.dumps(k).encode() + b":" + json.dumps(v).encode() for k, v in fields.items())
    # one copy of a body that may hold megabytes of images (slices of bytes copy)
    return b"".join((memoryview(body)[:inner], sep, added, b"}"))


OPEN, CLOSE = ord("{"), ord("}")
WHITESPACE = frozenset(b" \t\r\n")


def _end_of_content(body: bytes, end: int) -> int:
    """The index after the last non-whitespace byte of ``body[:end]``."""
    while end and body[end - 1] in WHITESPACE:
        end -= 1
    return end
