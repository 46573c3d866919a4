"""``medgemma-serve wait-idle``: wait until a server holds no admitted request.

A Kubernetes preStop hook for engine pods run by Ray Serve, where SIGTERM reaches Ray, not
our drain: the terminating pod has already left the Service's endpoints, so waiting for
its admitted requests (``medgemma_inflight_units`` + ``medgemma_queue_depth`` on its
/metrics) lets streams finish before the container is stopped. Returns 0 when idle,
when nothing answers (no replica on the pod) or at the timeout (which is logged).
"""

from __future__ import annotations

import logging
import time

import httpx

logger = logging.getLogger(__name__)

POLL_S = 1.0
BUSY_METRICS = ("medgemma_inflight_units", "medgemma_queue_depth")


def busy_requests(metrics_text: str) -> float:
    """Units held plus requests queued, from Prometheus exposition text (parsed by
    prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name in BUSY_METRICS
    )


def wait_idle(url: str, timeout_s: float, *, poll_s: float = POLL_S) -> int:
    deadline = time.monotonic() + timeout_s
    began = time.monotonic()
    while True:
        try:
            busy = busy_requests(httpx.get(url.rstrip("/") + "/metrics", timeout=5).text)
        except httpx.HTTPError:
            logger.info("wait-idle: %s does not answer; nothing to wait for", url)
            return 0
        if busy <= 0:
            logger.info("wait-idle: idle after %.1fs", time.monotonic() - began)
            return 0
        if time.monotonic() >= deadline:
            logger.warning("wait-idle: %.0f requests still admitted after %.0fs; giving up", busy, timeout_s)
            return 0
        time.sleep(poll_s)
