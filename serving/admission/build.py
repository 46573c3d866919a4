"""Builds the admission layer of one server from its settings and its running engine.

Guarantee: the capacity it enforces is what the engine reported at start-up
(``max_num_seqs`` and the KV cache size in tokens), and nothing here runs per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from serving.admission.clock import MonotonicClock
from serving.admission.controller import AdmissionController
from serving.admission.guard import GuardSettings, RequestGuard
from serving.admission.priority import PriorityClass
from serving.admission.keyreload import KeyReloader
from serving.admission.keys import KeyStore
from serving.admission.ledger import BudgetLedger, InProcessLedger
from serving.admission.estimate import PromptEstimator, tokenizer_counter
from serving.admission.inline_render import render_short_prompts_inline
from serving.admission.handoff import install as install_body_handoff
from serving.admission.middleware import AdmissionMiddleware
from serving.admission.preprocess import order_preprocessing_by_class
from serving.admission.queue import Capacity, ClassShares, FairQueue
from serving.capacity import SoldCapacity
from serving.enginehealth import EngineHealth
from serving.metrics import ServingMetrics
from serving.usage.engine_tokens import count_engine_tokens
from serving.usage.recorder import UsageRecorder
from serving.usage.tracing import request_tracer
from serving.usage.writer import UsageLog

logger = logging.getLogger(__name__)

MIN_HEADROOM = 8  # requests; measured on cpu-dev: 2 -> 0.84x direct throughput at c=32


@dataclass(frozen=True)
class AdmissionSettings:
    keys: KeyStore
    keys_file: Path | None = None  # reloaded on SIGHUP and on change when set
    keys_reload_interval_s: float = 2.0
    queue_size: int = 256
    queue_timeout_s: float = 30.0
    batch_queue_timeout_s: float = 300.0
    shares: ClassShares = field(default_factory=ClassShares)
    scale_on_batch: bool = False
    model_costs: dict[str, int] = field(default_factory=lambda: {"medgemma-4b-it": 1})
    redis_url: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    redis_tls_ca_file: Path | None = None
    lease_ttl_s: float = 15.0
    redis_timeout_s: float = 1.0
    engine_headroom: float = 0.25
    ledger_fallback: str = "share"
    guard: GuardSettings = field(default_factory=GuardSettings)
    stall_timeout_s: float = 60.0
    inline_render_max_bytes: int = 4096  # 0: every request renders on vLLM's thread
    usage_log: str | None = None  # a file path, "-" (stdout) or None (no records)
    usage_log_max_bytes: int = 100 * 2**20
    usage_log_backups: int = 10
    account_metrics_max: int | None = None  # None: per-account metrics unlabelled (off)
    otlp_traces_endpoint: str | None = None  # request traces (admission's spans and vLLM's)
    served_models: frozenset[str] = frozenset({"medgemma-4b-it"})
    # several API processes per engine: this one is ``api_process`` of ``api_processes``;
    # budgets are shared through the host ledger at ``host_ledger`` (unless Redis is used)
    api_process: int = 0
    api_processes: int = 1
    host_ledger: Path | None = None
    # the units the replica is sold at (serving/capacity.py); None: the engine's max_num_seqs
    capacity: SoldCapacity = SoldCapacity()


def share(total: int, process: int, processes: int) -> int:
    """API process ``process``'s part of ``total``: the parts differ by at most one and add
    up to ``total`` (at least 1 each)."""
    return max(1, total // processes + (1 if process < total % processes else 0))


def engine_capacity(vllm_config, headroom: float = 0.25, process: int = 0, processes: int = 1) -> Capacity:
    """What the engine can hold at once, as vLLM sized it at start-up, plus headroom; with
    several API processes, each one's equal share (vLLM's server hands each new connection
    to the process with the fewest open ones).

    Gating at exactly ``max_num_seqs`` starves the engine: a freed slot would wait for the
    next request's image decoding and tokenisation in the API server. With ``headroom``
    (a fraction of max_num_seqs, at least MIN_HEADROOM requests) preprocessed requests wait
    inside vLLM, so its batch stays full; the fair queue still orders everything beyond.
    """
    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    max_requests = max_num_seqs + max(MIN_HEADROOM, math.ceil(max_num_seqs * headroom))
    cache = vllm_config.cache_config
    tokens = getattr(cache, "kv_cache_size_tokens", None)
    if not tokens:
        tokens = (cache.num_gpu_blocks or 0) * cache.block_size
    return Capacity(max_requests=share(max_requests, process, processes),
                    kv_tokens=share(int(tokens) or 1, process, processes))  # fmt: skip


def engine_gate(vllm_config, settings: AdmissionSettings) -> tuple[Capacity, int]:
    """What this API process lets into the engine, and the units it reports as its capacity
    (summed over the API processes: the replica's). By default the engine's limits (gate:
    max_num_seqs plus headroom; units: max_num_seqs); with a sold capacity (serving/capacity.py)
    exactly those units, gate and capacity alike: the search measured that many in flight."""
    process, processes = settings.api_process, settings.api_processes
    capacity = engine_capacity(vllm_config, settings.engine_headroom, process, processes)
    if settings.capacity.units is None:
        return capacity, share(vllm_config.scheduler_config.max_num_seqs, process, processes)
    units = share(settings.capacity.units, process, processes)
    return dataclasses.replace(capacity, max_requests=units), units


def engine_aborter(engine_client):
    """``abort(ids)`` for admitted requests: aborts the given external request ids and every
    one vLLM derived from the first (``<id>-<i>``, ``<id>_<i>``, beam search's
    ``<id>-<uuid>-beam-<i>``), so no sub-request of a batch keeps running."""

    async def abort(ids: list[str]) -> None:
        base = ids[0]
        known = getattr(getattr(engine_client, "output_processor", None), "external_req_ids", {})
        derived = [rid for rid in list(known) if rid.startswith((base + "-", base + "_"))]
        await engine_client.abort(list(dict.fromkeys([*ids, *derived])))

    return abort


def build_ledger(settings: AdmissionSettings, metrics: ServingMetrics) -> tuple[BudgetLedger, Coroutine | None]:
    """The ledger the settings ask for, and its heartbeat to run (None for in-process)."""
    if settings.redis_url is None and settings.host_ledger is not None:
        from serving.admission.host_ledger import HostLedger

        logger.info("budget ledger: shared by this host's %d API processes (%s)", settings.api_processes,
                    settings.host_ledger)  # fmt: skip
        return HostLedger(settings.host_ledger, settings.api_process), None
    if settings.redis_url is None:
        return InProcessLedger(), None
    from serving.admission.redis_ledger import RedisLedger, connect

    ledger = RedisLedger(
        connect(
            settings.redis_url,
            settings.redis_timeout_s,
            password=settings.redis_password,
            tls_ca_file=settings.redis_tls_ca_file,
        ),
        lease_ttl_s=settings.lease_ttl_s,
        fallback_policy=settings.ledger_fallback,
        on_fallback=lambda active: metrics.ledger_fallback.set(1 if active else 0),
    )
    logger.info(
        "budget ledger: Redis%s (lease TTL %.0fs, fallback %s)",
        " over TLS" if settings.redis_url.startswith("rediss://") else "",
        settings.lease_ttl_s,
        settings.ledger_fallback,
    )
    return ledger, ledger.run_heartbeat()


@dataclass
class Admission:
    """The admission layer of one server: what the app wraps and what runs beside it."""

    controller: AdmissionController
    middleware: Callable[[object], AdmissionMiddleware]  # wraps vLLM's ASGI app
    tasks: list[asyncio.Task]  # ticker, stall watch, key watch, ledger heartbeat
    usage: UsageRecorder


def build_usage(settings: AdmissionSettings, metrics: ServingMetrics, engine_client=None) -> UsageRecorder:
    """The usage recorder the settings ask for; the engine's token counts hooked when records
    or per-account metrics are on."""
    log = None
    if settings.usage_log is not None:
        log = UsageLog(settings.usage_log, metrics, max_bytes=settings.usage_log_max_bytes,
                       backups=settings.usage_log_backups)  # fmt: skip
        logger.info("usage records: %s (rotated at %d MiB, %d kept)", "stdout" if settings.usage_log == "-"
                    else settings.usage_log, settings.usage_log_max_bytes // 2**20, settings.usage_log_backups)  # fmt: skip
    tracer = request_tracer(settings.otlp_traces_endpoint)
    if tracer is not None:
        logger.info("request traces: admission spans and vLLM's request span to %s", settings.otlp_traces_endpoint)
    engine_tokens = None
    if engine_client is not None and (log is not None or settings.account_metrics_max or tracer is not None):
        engine_tokens = count_engine_tokens(engine_client)
    return UsageRecorder(metrics, log, served_models=settings.served_models, tracer=tracer,
                         account_metrics_max=settings.account_metrics_max, engine_tokens=engine_tokens)  # fmt: skip


def build_admission(engine_client, settings: AdmissionSettings, metrics: ServingMetrics,
                    health: EngineHealth) -> Admission:  # fmt: skip
    """The controller, guard and estimator sized from the running engine, and their
    background tasks started on this event loop."""
    vllm_config = engine_client.vllm_config
    capacity, engine_slots = engine_gate(vllm_config, settings)
    metrics.set_capacity_source(settings.capacity.source)
    clock = MonotonicClock()
    ledger, heartbeat = build_ledger(settings, metrics)
    controller = AdmissionController(
        settings.keys,
        ledger,
        FairQueue(capacity, settings.queue_size, clock, shares=settings.shares,
                  engine_slots=engine_slots),  # fmt: skip
        metrics,
        max_model_len=vllm_config.model_config.max_model_len,
        model_costs=settings.model_costs,
        queue_timeout_s=settings.queue_timeout_s,
        batch_queue_timeout_s=settings.batch_queue_timeout_s,
        scale_on_batch=settings.scale_on_batch,
        clock=clock,
        engine_units=engine_slots,  # summed over the API processes: the engine's max_num_seqs
        health=health,
        abort=engine_aborter(engine_client),
    )
    # A lower bound per image: its soft tokens (256 for MedGemma), not the wrapper tokens.
    image_tokens = getattr(vllm_config.model_config.hf_config, "mm_tokens_per_image", 256)
    estimator = PromptEstimator(
        tokenizer_counter(engine_client.get_tokenizer()), image_tokens, vllm_config.model_config.max_model_len
    )
    guard = RequestGuard(settings.guard)
    usage = build_usage(settings, metrics, engine_client)
    order_preprocessing_by_class(engine_client)  # a STAT image is not queued behind batch ones
    install_body_handoff()  # vLLM takes the guard's parse of a body instead of parsing it again
    inline_max = render_short_prompts_inline(engine_client, settings.inline_render_max_bytes,
                                             metrics.renderer_inline_jobs)  # short text prompts: no thread handoff
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(controller.run_ticker()), loop.create_task(controller.watch_stalled(settings.stall_timeout_s))]
    if heartbeat is not None:
        tasks.append(loop.create_task(heartbeat))
    if settings.keys_file is not None:
        reloader = KeyReloader(settings.keys_file, controller, metrics,
                               audit=usage.log.emit if usage.log is not None else None, replica=usage.replica)  # fmt: skip
        tasks.append(reloader.install(loop, signal.SIGHUP, settings.keys_reload_interval_s))
    limits = controller.queue.class_limits
    logger.info(
        "admission: %s, engine capacity %d requests / %d KV tokens (interactive+batch %d / %d, "
        "batch %d / %d), queue %d per class (timeout %.0fs, batch %.0fs)",
        "OPEN MODE (no keys file)" if settings.keys.open_mode else f"{len(settings.keys.accounts)} accounts",
        capacity.max_requests,
        capacity.kv_tokens,
        limits[PriorityClass.INTERACTIVE],
        controller.queue.class_token_limits[PriorityClass.INTERACTIVE],
        limits[PriorityClass.BATCH],
        controller.queue.class_token_limits[PriorityClass.BATCH],
        settings.queue_size,
        settings.queue_timeout_s,
        settings.batch_queue_timeout_s,
    )
    return Admission(controller, lambda app: AdmissionMiddleware(app, controller, estimator, guard, usage, inline_max),
                     tasks, usage)  # fmt: skip
