"""Every metric the product defines, in one place, on one registry passed in explicitly.

Guarantees: names are prefixed ``medgemma_`` and never collide with vLLM's ``vllm:`` names;
labels never carry API keys, prompts or any request content. ``ServingMetrics`` owns its
``CollectorRegistry``; tests build their own, and the launcher exposes it on vLLM's
``/metrics`` beside vLLM's engine metrics.

With several API processes per engine (``multiprocess``: ``PROMETHEUS_MULTIPROC_DIR`` set
before ``prometheus_client`` was imported, as vLLM's multi-server mode does), every value
goes to the shared directory and vLLM's ``/metrics`` in any process reads them all: each
gauge says how its processes' values combine (``MULTIPROCESS_MODES``), the build info is a
gauge (``Info`` does not exist there), and ``computed`` gauges are refreshed by a task
(``refresh_computed``) instead of at scrape time.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from serving.capacity import SOURCES as CAPACITY_SOURCES

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


BUILD_LABELS = ("profile", "model", "served_model_name", "vllm_version")
BUILD_HELP = "What this server runs: engine profile, model, served name, vLLM version."
# How one replica's API processes combine, per gauge (the rest: counters and histograms add up).
MULTIPROCESS_MODES = {
    "medgemma_engine_ready": "livemin",  # ready only when every process is
    "medgemma_ledger_fallback": "livemax",
    "medgemma_build_info": "livemax",
    "medgemma_capacity_source": "livemax",
}  # every other gauge: livesum (units, requests, capacity shares, queue depth)


def multiprocess_mode_on() -> bool:
    """True in an API process of a multi-process server (values live in shared files)."""
    from prometheus_client import values

    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") is not None and values.ValueClass is not values.MutexValue


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, multiprocess: bool | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_mode_on() if multiprocess is None else multiprocess
        self._computed: list[tuple[Gauge, Callable[[], float]]] = []
        if self.multiprocess:
            self.build = self._gauge("medgemma_build_info", BUILD_HELP, BUILD_LABELS, registry=self.registry)
        else:
            self.build = Info("medgemma_build", BUILD_HELP, registry=self.registry)
        self.engine_ready = self._gauge(
            "medgemma_engine_ready",
            "1 once the engine can serve (what /ready reports), 0 while loading or failed.",
            registry=self.registry,
        )

        self.admission_total = Counter(
            "medgemma_admission",
            "Admission decisions by outcome (admitted, rejected_*, evicted_*) and priority class "
            "(stat, interactive, batch; none for refusals made before the class is known).",
            ["outcome", "priority"],
            registry=self.registry,
        )
        self.inflight_units = self._gauge(
            "medgemma_inflight_units",
            "Concurrency units held by admitted requests on this replica, by plan.",
            ["plan"],
            registry=self.registry,
        )
        self.inflight_requests = self._gauge(
            "medgemma_inflight_requests",
            "Admitted requests holding an engine slot on this replica, by priority class.",
            ["priority"],
            registry=self.registry,
        )
        for priority in ("stat", "interactive", "batch"):  # exposed from the start
            self.inflight_requests.labels(priority=priority)
        self.capacity_units = self._gauge(
            "medgemma_capacity_units",
            "Units this replica serves at once, the autoscaling capacity: its engine's max_num_seqs, "
            "or the capacity measured at an SLO (see medgemma_capacity_source).",
            registry=self.registry,
        )
        self.capacity_source = self._gauge(
            "medgemma_capacity_source",
            "Where medgemma_capacity_units comes from: 1 for the source in force (max_num_seqs, "
            "setting: a number given, capacity_file: measured by medgemma-loadtest capacity).",
            ["source"],
            registry=self.registry,
        )
        self.demand_units = self._gauge(
            "medgemma_demand_units",
            "The autoscaling signal of this replica: units of the requests it serves or holds "
            "waiting, of the classes that scale (not batch, unless scale_on_batch).",
            registry=self.registry,
        )
        self.queue_depth = self._gauge(
            "medgemma_queue_depth",
            "Admitted requests waiting for a free engine slot.",
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "medgemma_queue_wait_seconds",
            "Time admitted requests waited for an engine slot, by priority class.",
            ["priority"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.ledger_fallback = self._gauge(
            "medgemma_ledger_fallback",
            "1 while the shared (Redis) budget ledger is unreachable, or rejoining for a lease TTL after; a local share applies.",
            registry=self.registry,
        )

        # Latency as the client sees it: from the request's arrival at the admission layer
        # (queue wait included) to its first content byte, between stream events, to its end.
        # Admitted requests that got a 2xx response only; vLLM's vllm:* histograms time the
        # engine alone.
        self.request_ttft_seconds = Histogram(
            "medgemma_request_ttft_seconds",
            "Time to first token as the client sees it (arrival to first response body bytes).",
            ["stream", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_tpot_seconds = Histogram(
            "medgemma_request_time_per_output_token_seconds",
            "Streams: mean time between content events after the first (one event per token).",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.request_e2e_seconds = Histogram(
            "medgemma_request_e2e_seconds",
            "End-to-end latency as the client sees it (arrival to the response's last byte).",
            ["stream", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.keys_reloads_total = Counter(
            "medgemma_keys_reloads",
            "Keys file reloads (SIGHUP or file change) by result: ok, error (old keys kept).",
            ["result"],
            registry=self.registry,
        )
        for result in ("ok", "error"):  # exposed from the start, so rate() and alerts see 0
            self.keys_reloads_total.labels(result=result)

        self.renderer_inline_jobs = Counter(
            "medgemma_renderer_inline_jobs",
            "Chat templates and tokenisations of short text requests run on the event loop, "
            "not handed to vLLM's renderer thread (--inline-render-max-kib).",
            registry=self.registry,
        )

        # Usage: the records' own health, and per-account figures (labelled only with
        # --account-metrics, at most account_metrics_max accounts, the rest as "other").
        self.usage_records_written = Counter(
            "medgemma_usage_records_written",
            "Usage records written to the usage log.",
            registry=self.registry,
        )
        self.usage_records_dropped = Counter(
            "medgemma_usage_records_dropped",
            "Usage records dropped: queue_full (the writer fell behind), write_error (a full "
            "disk, a vanished folder). The requests themselves were served.",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("queue_full", "write_error"):
            self.usage_records_dropped.labels(reason=reason)
        self.account_unit_seconds = Counter(
            "medgemma_account_unit_seconds",
            "Concurrency units x seconds held from admission to release, by account.",
            ["account"],
            registry=self.registry,
        )
        self.account_tokens = Counter(
            "medgemma_account_tokens",
            "Tokens the engine counted, by account and direction (prompt, completion).",
            ["account", "direction"],
            registry=self.registry,
        )
        self.account_requests = Counter(
            "medgemma_account_requests",
            "Requests to the model endpoints by account and outcome (none: the key was refused).",
            ["account", "outcome"],
            registry=self.registry,
        )
        self.account_inflight_units = self._gauge(
            "medgemma_account_inflight_units",
            "Concurrency units held right now on this replica, by account.",
            ["account"],
            registry=self.registry,
        )

    def _gauge(self, name: str, documentation: str, labelnames=(), **kwargs) -> Gauge:
        if self.multiprocess:
            kwargs["multiprocess_mode"] = MULTIPROCESS_MODES.get(name, "livesum")
        return Gauge(name, documentation, labelnames, **kwargs)

    def set_capacity_source(self, source: str) -> None:
        for name in CAPACITY_SOURCES:
            self.capacity_source.labels(source=name).set(1 if name == source else 0)

    def set_build(self, *, profile: str, model: str, served_model_name: str, vllm_version: str):
        info = dict(zip(BUILD_LABELS, (profile, model, served_model_name, vllm_version)))
        if self.multiprocess:
            self.build.labels(**info).set(1)
        else:
            self.build.info(info)

    def computed(self, gauge: Gauge, value: Callable[[], float]) -> None:
        """``gauge`` reads ``value()``: at each scrape, or (multiprocess) at each refresh."""
        if self.multiprocess:
            self._computed.append((gauge, value))
        else:
            gauge.set_function(value)

    def refresh_computed(self) -> None:
        for gauge, value in self._computed:
            gauge.set(value())
