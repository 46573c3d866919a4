"""Our log lines: format, request ids, and what they never contain.

Guarantees:
- Every line from ``serving.*`` loggers carries the id of the request it was written for
  (``rid=...``, ``-`` outside a request), the same id the client gets in ``x-request-id``.
- No line carries request content (prompts, images, generated text) or API keys: our code
  logs outcomes, sizes and ids only, and vLLM's request logging stays off
  (``--enable-log-requests`` is never passed; a test sends a canary and greps every log).
- No line carries a secret from the settings: URL passwords (``redis://:pw@...``) and the
  values of secret-bearing vLLM flags (``--api-key``, ``--hf-token``) are shown as ``***``
  (``redact_url``, ``redact_args``); the Redis password setting is never printed.
"""

from __future__ import annotations

import contextvars
import logging
import re

# The id of the request being handled; set by the admission middleware.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

FORMAT = "%(asctime)s %(levelname)s %(name)s rid=%(request_id)s: %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str, process: str | None = None) -> None:
    """Our loggers get their own handler: vLLM reconfigures the root logger as it starts.
    ``process`` names one of several API processes in every line (``api1``)."""
    log = logging.getLogger("serving")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT.replace(" rid=", f" {process} rid=") if process else FORMAT))
        handler.addFilter(RequestIdFilter())
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


# --- secrets: what settings and arguments look like in a log ---------------------------

REDACTED = "***"
# vLLM flags whose values are secrets (``--api-key`` takes one or more values).
SECRET_FLAGS = ("--api-key", "--hf-token")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@", re.I)


def redact_url(text: str | None) -> str | None:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``, and a user part with
    no password (which may be a token) -> ``scheme://***@host``; anywhere in ``text``."""
    if not text:
        return text

    def redact(match: re.Match) -> str:
        user, colon, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:{REDACTED}@" if colon else f"{match['scheme']}{REDACTED}@"

    return _URL_CREDENTIALS.sub(redact, text)


def redact_args(argv: list[str]) -> list[str]:
    """A copy of a command line with the values of secret-bearing flags (``--api-key x y``,
    ``--hf-token=x``) and any URL's password replaced by ``***``."""
    out: list[str] = []
    secret_values = False
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if arg.startswith("-"):
            secret_values = False
            if flag in SECRET_FLAGS:
                if eq:
                    out.append(f"{flag}={REDACTED}")
                else:
                    out.append(arg)
                    secret_values = True
                continue
        elif secret_values:
            out.append(REDACTED)
            continue
        out.append(redact_url(arg))
    return out
