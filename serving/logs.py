"""Our log lines: format, request ids, and what they never contain.

Guarantees:
- Every line from ``serving.*`` loggers carries the id of the request it was written for
  (``rid=...``, ``-`` outside a request), the same id the client gets in ``x-request-id``.
- No line carries request content (prompts, images, generated text) or API keys: our code
  logs outcomes, sizes and ids only, and vLLM's request logging stays off
  (``--enable-log-requests`` is never passed; a test sends a canary and greps every log).
"""

from __future__ import annotations

import contextvars
import logging

# The id of the request being handled; set by the admission middleware.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

FORMAT = "%(asctime)s %(levelname)s %(name)s rid=%(request_id)s: %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str) -> None:
    """Our loggers get their own handler: vLLM reconfigures the root logger as it starts."""
    log = logging.getLogger("serving")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(RequestIdFilter())
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
