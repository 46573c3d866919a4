"""Server assembly: settings -> keys -> model -> engine -> app -> background tasks.

The one place a server is put together; both entry points call it: ``medgemma-serve serve``
(``serving.launcher``, under vLLM's own uvicorn) and the Ray Serve replica
(``serving.ray_app``). Nothing here parses a command line, and nothing here imports an
entry point.

Guarantees:
- ``prepare_server`` does everything that can fail before an engine process starts: keys
  file, model check (or the dev checkpoint), media environment, the server's context.
- ``build_served_app`` attaches, in this order, to vLLM's own app over a running engine:
  probes, our metrics, the admission layer (in front of every request), the drain and the
  engine watch. Every background task is started here and kept on ``app.state.medgemma``.
- The engine's health has one owner (``EngineHealth`` on the context); vLLM's shutdown of
  the engine marks an orderly stop there, so a stopped engine is no failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from serving import config, devmodel, engine
from serving.admission.build import Admission, AdmissionSettings, build_admission
from serving.admission.guard import GuardSettings
from serving.admission.keys import KeysFileError, KeyStore
from serving.admission.middleware import MODEL_PATHS, PUBLIC_PATHS
from serving.admission.queue import ClassShares
from serving.capacity import SoldCapacity, read_capacity
from serving.cpuaffinity import colocate_engine_core
from serving.drain import Drainer
from serving.enginehealth import EngineHealth
from serving.enginewatch import EngineProgress, EngineWatch
from serving.metrics import ServingMetrics
from serving.probes import attach_probes
from serving.usage.destination import DEFAULT_USAGE_FILE, usage_log_target
from serving.vllm_app import build_vllm_app, limit_openapi, wrap_app

logger = logging.getLogger(__name__)

DEV_MODEL_BANNER = (
    "\n" + "!" * 78 + "\n"
    "!! DEV CHECKPOINT: tiny RANDOM weights (%s).\n"
    "!! Outputs are RANDOM TEXT, not medical answers. Pass --model for the real model.\n"
    + "!" * 78
)


@dataclass
class ServerContext:
    """What one server's parts share: resolved settings, the metrics registry, the engine's health."""

    profile: str
    model: str
    served_model_name: str
    metrics: ServingMetrics
    admission: AdmissionSettings
    drain_timeout_s: float = 120.0
    engine_hang_timeout_s: float = 120.0
    health: EngineHealth = field(default_factory=EngineHealth)


@dataclass
class ServedApp:
    """What runs beside the app: admission, the drain, the engine watch, their tasks."""

    admission: Admission
    drainer: Drainer
    tasks: list[asyncio.Task]


def load_keys(settings: config.ServeSettings) -> KeyStore:
    if settings.keys_file is None:
        logger.warning(
            "no keys file: OPEN MODE, every request shares one anonymous account of %d "
            "units; pass --keys-file for per-account budgets",
            settings.open_budget,
        )
        return KeyStore.open(settings.open_budget)
    try:
        return KeyStore.load(settings.keys_file)
    except KeysFileError as exc:
        raise config.SettingsError(str(exc)) from None


def prepare_model(settings: config.ServeSettings, resolved: engine.EngineSettings) -> None:
    """Before serving: build the dev checkpoint if needed, or check the model can be loaded."""
    if config.uses_dev_model(settings, resolved):
        devmodel.ensure(settings.dev_model_dir)
    else:
        config.check_model_access(resolved.model)


def sold_capacity(settings: config.ServeSettings, resolved: engine.EngineSettings, api_processes: int = 1) -> SoldCapacity:
    """The units the replica is sold at (``--capacity-file``), checked against this engine's
    profile, vLLM version and max_num_seqs. Raises ``SettingsError``."""
    from vllm.version import __version__ as vllm_version

    max_num_seqs = int(engine.passthrough_value(tuple(engine.engine_args(resolved)), "--max-num-seqs"))
    return read_capacity(settings.capacity_file, profile=resolved.profile, vllm_version=vllm_version,
                         max_num_seqs=max_num_seqs, api_processes=api_processes)  # fmt: skip


def context_from_settings(settings: config.ServeSettings, resolved: engine.EngineSettings, keys: KeyStore,
                          usage_file: str = DEFAULT_USAGE_FILE, capacity: SoldCapacity | None = None) -> ServerContext:  # fmt: skip
    """The ServerContext for validated settings, their resolved engine settings and the keys
    (``usage_file``: the usage file's default name; ``capacity``: the sold capacity when the
    caller has checked it already)."""
    return ServerContext(
        profile=resolved.profile,
        model=resolved.model,
        served_model_name=resolved.served_model_name,
        metrics=ServingMetrics(),
        admission=AdmissionSettings(
            keys=keys,
            keys_file=settings.keys_file,
            keys_reload_interval_s=settings.keys_reload_interval_s,
            queue_size=settings.queue_size,
            queue_timeout_s=settings.queue_timeout_s,
            batch_queue_timeout_s=settings.batch_queue_timeout_s,
            shares=ClassShares(interactive=settings.interactive_share, batch=settings.batch_share),
            scale_on_batch=settings.scale_on_batch,
            engine_headroom=settings.engine_headroom,
            model_costs=settings.model_costs,
            redis_url=settings.redis_url,
            redis_password=settings.redis_password.get_secret_value() if settings.redis_password else None,
            redis_tls_ca_file=settings.redis_tls_ca_file,
            lease_ttl_s=settings.lease_ttl_s,
            redis_timeout_s=settings.redis_timeout_s,
            ledger_fallback=settings.ledger_fallback,
            stall_timeout_s=settings.stream_stall_timeout_s,
            inline_render_max_bytes=int(settings.inline_render_max_kib * 1024),
            usage_log=usage_log_target(settings, usage_file),
            usage_log_max_bytes=int(settings.usage_log_max_mib * 2**20),
            usage_log_backups=settings.usage_log_backups,
            account_metrics_max=settings.account_metrics_max if settings.account_metrics else None,
            served_models=frozenset({resolved.served_model_name, *settings.model_costs}),
            otlp_traces_endpoint=settings.otlp_traces_endpoint,
            capacity=capacity if capacity is not None else sold_capacity(settings, resolved),
            guard=GuardSettings(
                max_body_bytes=int(settings.max_body_mib * 2**20),
                body_timeout_s=settings.body_timeout_s,
                max_image_pixels=settings.max_image_pixels,
                remote_image_hosts=frozenset(h.lower() for h in settings.remote_image_hosts),
                remote_image_private_networks=settings.remote_image_private_networks,
                max_images=settings.max_images_per_prompt,
            ),
        ),
        drain_timeout_s=settings.drain_timeout_s,
        engine_hang_timeout_s=settings.engine_hang_timeout_s,
    )


def context_for_api_process(settings: config.ServeSettings, resolved: engine.EngineSettings, process: int,
                            processes: int, host_ledger: Path, usage_file: str = DEFAULT_USAGE_FILE) -> ServerContext:  # fmt: skip
    """The context of API process ``process`` of ``processes`` in front of one
    engine: the same settings, budgets through the host ledger (or Redis), its own share of
    the engine and its own usage file."""
    context = context_from_settings(settings, resolved, load_keys(settings), usage_file)
    usage_log = context.admission.usage_log
    if usage_log not in (None, "-"):
        path = Path(usage_log)
        usage_log = str(path.with_name(f"{path.stem}-api{process}{path.suffix}"))
    context.admission = dataclasses.replace(context.admission, api_process=process, usage_log=usage_log,
                                            api_processes=processes, host_ledger=host_ledger)  # fmt: skip
    return context


def prepare_server(settings: config.ServeSettings, resolved: engine.EngineSettings,
                   usage_file: str = DEFAULT_USAGE_FILE, api_processes: int = 1) -> tuple[list[str], ServerContext]:  # fmt: skip
    """Keys, capacity, model and environment checked and set up; returns vLLM's argv and the
    server's context (``usage_file``: the usage file's default name; ``api_processes``: how
    many share the engine). Raises ``SettingsError`` before any engine process starts."""
    keys = load_keys(settings)
    capacity = sold_capacity(settings, resolved, api_processes)  # before a model is fetched or built
    prepare_model(settings, resolved)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", settings.log_level.upper())
    os.environ.update(engine.media_env(settings.remote_image_timeout_s, settings.remote_image_max_mib))
    os.environ.update(engine.image_env(settings.image_preprocessing))
    if config.uses_dev_model(settings, resolved):
        logger.warning(DEV_MODEL_BANNER, resolved.model)
    logger.info("profile %s, model %s, settings %s", resolved.profile, resolved.model, config.describe(settings))
    if capacity.units is not None:
        logger.info("capacity: %d units per replica (%s)", capacity.units, capacity.source)
    return engine.engine_args(resolved), context_from_settings(settings, resolved, keys, usage_file, capacity)


def watch_shutdown(engine_client, health: EngineHealth) -> None:
    """Mark vLLM's shutdown of the engine as an orderly stop in ``health`` (see ``EngineHealth.stop``)."""
    shutdown = engine_client.shutdown

    def shutdown_on_purpose(*args, **kwargs):
        health.stop()
        return shutdown(*args, **kwargs)

    engine_client.shutdown = shutdown_on_purpose


async def refresh_computed(metrics: ServingMetrics, interval_s: float = 0.25) -> None:
    """Multi-process metrics: computed gauges are written out, not read at scrape time."""
    while True:
        metrics.refresh_computed()
        await asyncio.sleep(interval_s)


async def build_served_app(
    args,
    context: ServerContext,
    engine_client,
    *,
    on_drained: Callable[[], None] | None = None,
    on_engine_failed: Callable[[], None] | None = None,
):
    """vLLM's OpenAI app over a running engine with our layers attached and the drain and
    engine watch running. ``on_drained`` runs when a drain ends, ``on_engine_failed`` when
    the engine died or hung (default for both: SIGINT to this process, vLLM's own shutdown)."""
    from vllm.platforms import current_platform
    from vllm.v1.metrics.prometheus import get_prometheus_registry
    from vllm.version import __version__ as vllm_version

    if current_platform.is_cpu():
        colocate_engine_core()  # or its poll loop starves this process (serving/cpuaffinity.py)
    health, metrics = context.health, context.metrics
    health.watch_errored(lambda: engine_client.errored)
    app = await build_vllm_app(args, engine_client)
    admission = build_admission(engine_client, context.admission, metrics, health)
    controller = admission.controller
    attach_probes(app, health, controller, context.served_model_name)
    limit_openapi(app, MODEL_PATHS | PUBLIC_PATHS)
    metrics.set_build(profile=context.profile, model=context.model,
                      served_model_name=context.served_model_name, vllm_version=vllm_version)  # fmt: skip
    metrics.computed(metrics.engine_ready, lambda: 0.0 if health.failed else 1.0)
    if not metrics.multiprocess:  # else vLLM's /metrics reads every process's values from files
        get_prometheus_registry().register(metrics.registry)
    wrap_app(app, admission.middleware)
    drainer = Drainer(grace_s=context.drain_timeout_s, admission=controller, shutdown=on_drained)
    watch_shutdown(engine_client, health)
    watch = EngineWatch(health=health, admission=controller, progress=EngineProgress(engine_client),
                        hang_timeout_s=context.engine_hang_timeout_s, shutdown=on_engine_failed)  # fmt: skip
    tasks = [*admission.tasks, asyncio.get_running_loop().create_task(watch.run())]
    if metrics.multiprocess:
        tasks.append(asyncio.get_running_loop().create_task(refresh_computed(metrics)))
    app.state.medgemma = ServedApp(admission, drainer, tasks)
    return app
