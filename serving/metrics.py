"""Every metric the product defines, in one place, on one registry passed in explicitly.

Guarantees: names are prefixed ``medgemma_`` and never collide with vLLM's ``vllm:`` names;
labels never carry API keys, prompts or any request content. ``ServingMetrics`` owns its
``CollectorRegistry``; tests build their own, and the launcher exposes it on vLLM's
``/metrics`` beside vLLM's engine metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Info


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

    def set_build(self, *, profile: str, model: str, served_model_name: str, vllm_version: str):
        self.build.info(
            {
                "profile": profile,
                "model": model,
                "served_model_name": served_model_name,
                "vllm_version": vllm_version,
            }
        )
