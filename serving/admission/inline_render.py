"""Short text prompts rendered on the event loop, not handed to vLLM's renderer thread.

vLLM 0.32 renders every chat template and tokenizes every prompt on a worker thread of the
API process (``BaseRenderer._executor``, two handoffs per chat request), so that a long
prompt never holds the event loop. For a short text request each handoff (a submit, a
thread wake, the GIL handed over and back, a wake of the loop) costs CPU of the same order
as the work it hands off.

``render_inline`` is a context variable the admission middleware sets for a request with no
image whose body is at most ``--inline-render-max-kib`` (4 KiB by default). While it is set,
what vLLM submits to that executor runs at once on the caller's thread and returns a
finished future.

Guarantees:
- Only a request the middleware marked runs inline; a long prompt, an image request (its
  chat template and tokenisation too) and work outside a request go to vLLM's pool as before.
- The result or the exception reaches the caller as it would from the pool.
- vLLM's tokenizer is a pool of copies (``maybe_make_thread_pool``, one more than the
  workers), so the loop's thread uses its own copy.
- vLLM's render timeout (``VLLM_CHAT_TEMPLATE_RENDER_TIMEOUT``) cannot interrupt an inline
  render; the body bound keeps one to about a millisecond, and the template is the
  server's (vLLM refuses a request's own ``chat_template`` unless told to trust it).
- If this vLLM's renderer is not the shape we know, nothing changes and a warning says so.
"""

from __future__ import annotations

import contextvars
import logging
from concurrent.futures import Future

from serving.admission.preprocess import run_into

logger = logging.getLogger(__name__)

render_inline: contextvars.ContextVar[bool] = contextvars.ContextVar("render_inline", default=False)


def render_short_prompts_inline(engine_client, max_bytes: int, jobs=None) -> int:
    """Make vLLM's renderer executor run marked requests' work inline, counting each job in
    ``jobs`` (a Prometheus counter). Returns the body size up to which the middleware marks
    text requests: ``max_bytes``, or 0 when that is 0 or this vLLM's renderer has no such
    executor (every request keeps vLLM's thread handoff)."""
    if max_bytes <= 0:
        return 0
    executor = getattr(getattr(engine_client, "renderer", None), "_executor", None)
    pooled = getattr(executor, "submit", None)
    if pooled is None:
        logger.warning("short prompts keep vLLM's renderer thread: this vLLM's renderer has no _executor")
        return 0

    def submit(fn, /, *args, **kwargs) -> Future:
        if not render_inline.get():
            return pooled(fn, *args, **kwargs)
        if jobs is not None:
            jobs.inc()
        future: Future = Future()
        future.set_running_or_notify_cancel()
        run_into(future, fn, args, kwargs)  # a finished future, as the pool's would be
        return future

    executor.submit = submit  # the object vLLM's make_async wrappers captured stays the same
    logger.info("text requests with bodies up to %d bytes render on the event loop", max_bytes)
    return max_bytes

