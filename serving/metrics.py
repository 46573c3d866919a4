"""Every metric the product defines, in one place, on one registry passed in explicitly.

Guarantees: names are prefixed ``medgemma_`` and never collide with vLLM's ``vllm:`` names;
labels never carry API keys, prompts or any request content. ``ServingMetrics`` owns its
``CollectorRegistry``; tests build their own, and the launcher exposes it on vLLM's
``/metrics`` beside vLLM's engine metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.build = Info(
            "medgemma_build",
            "What this server runs: engine profile, model, served name, vLLM version.",
            registry=self.registry,
        )
        self.engine_ready = Gauge(
            "medgemma_engine_ready",
            "1 once the engine can serve (what /ready reports), 0 while loading or failed.",
            registry=self.registry,
        )

        self.admission_total = Counter(
            "medgemma_admission",
            "Admission decisions by outcome (admitted, rejected_*, evicted_*).",
            ["outcome"],
            registry=self.registry,
        )
        self.inflight_units = Gauge(
            "medgemma_inflight_units",
            "Concurrency units held by admitted requests on this replica, by plan.",
            ["plan"],
            registry=self.registry,
        )
        self.capacity_units = Gauge(
            "medgemma_capacity_units",
            "Concurrent requests this replica's engine takes at once (its max_num_seqs).",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "medgemma_queue_depth",
            "Admitted requests waiting for a free engine slot.",
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "medgemma_queue_wait_seconds",
            "Time admitted requests waited for an engine slot.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.ledger_fallback = Gauge(
            "medgemma_ledger_fallback",
            "1 while the shared (Redis) budget ledger is unreachable and a local share applies.",
            registry=self.registry,
        )

        self.keys_reloads_total = Counter(
            "medgemma_keys_reloads",
            "Keys file reloads (SIGHUP or file change) by result: ok, error (old keys kept).",
            ["result"],
            registry=self.registry,
        )

    def set_build(self, *, profile: str, model: str, served_model_name: str, vllm_version: str):
        self.build.info(
            {
                "profile": profile,
                "model": model,
                "served_model_name": served_model_name,
                "vllm_version": vllm_version,
            }
        )
