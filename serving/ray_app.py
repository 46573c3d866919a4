"""MedGemma as a Ray Serve application: ``build_app(args) -> Application``.

Usable from ``serve run serving.ray_app:build_app``, from a Serve config file (KubeRay's
``serveConfigV2``: ``import_path: serving.ray_app:build_app`` with ``args``), and from
``medgemma-serve ray``.

Guarantees:
- Each replica is the whole product: vLLM's engine and OpenAI app with our admission layer,
  metrics, drain and engine watch attached in-process (``assembly.build_served_app``), the
  same code ``medgemma-serve serve`` runs. Budgets are global through the Redis ledger.
- Replicas answer HTTP on their own port (Ray Serve direct ingress: 30000 and up on each
  node), so request bodies and token streams never cross Ray's handle path; Ray Serve does
  what it is best at: replica lifecycle, health checks, placement on GPU nodes, autoscaling.
- A replica whose engine dies or hangs ends its running requests at once (an SSE error
  event ``engine_unavailable``, or a 503), then exits with its engine
  (``exit_failed_replica``), so Ray replaces it within a health-check period. A released
  port is free again at once (``RAY_SERVE_PORT_QUARANTINE_S=0``: no Ray proxy routes by
  port here), so the replacement answers where its predecessor did: on Kubernetes each
  engine pod has exactly one port (30000), on one machine the lowest free one.
- Autoscaling follows cost units, not request counts (``serving.autoscale``); every replica
  reports its demand and capacity in ``record_autoscaling_stats``.
- Settings are validated by ``build_app`` before any replica starts (``AppSettings``); the
  engine profile is resolved on the replica, where the GPU is.
- Stopping a replica (scale-down, redeploy) drains it: new requests get 503 ``draining``,
  admitted ones finish within ``drain_timeout_s``, then the engine shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving import config, layers
from serving.autoscale import CAPACITY, DEMAND

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "medgemma"
# What Ray Serve adds to a stopping replica's drain for its own stop.
SHUTDOWN_MARGIN_S = 15.0


class ScalingSettings(BaseModel):
    """How many engine replicas run (Ray Serve autoscaling on cost units)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0, description="Fewest engine replicas (0 only with allow_scale_to_zero).")
    max_replicas: int = Field(4, ge=1, description="Most engine replicas (one GPU each).")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time (default: min_replicas).")
    target_utilisation: float = Field(
        0.75, gt=0, le=1,
        description="Share of a replica's capacity (max_num_seqs) that demand should fill; "
        "desired replicas = ceil(demand units / (capacity x target)).",
    )  # fmt: skip
    upscale_delay_s: float = Field(30.0, ge=0, description="Demand must stay above target this long to add a replica.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Demand must stay below target this long to remove one.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window the replicas' reports are averaged over.")
    metrics_interval_s: float = Field(5.0, gt=0, description="How often each replica reports demand and capacity.")
    allow_scale_to_zero: bool = Field(
        False, description="Allow min_replicas 0: the first request then waits minutes for a GPU and a model load."
    )
    replica_resources: dict[str, float] | None = Field(
        None,
        description="Ray resources per replica (default: 1 GPU on CUDA profiles, 1 CPU on cpu-dev).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ScalingSettings:
        if self.min_replicas == 0 and not self.allow_scale_to_zero:
            raise ValueError("min_replicas 0 scales to zero: set allow_scale_to_zero: true to mean it")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class AppSettings(BaseModel):
    """``build_app``'s arguments: ``serve`` (every ``medgemma-serve serve`` setting; the
    environment's MEDGEMMA_* variables still apply) and ``scaling``."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    serve: config.ServeSettings
    scaling: ScalingSettings

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppSettings:
        args = dict(args or {})
        unknown = sorted(set(args) - {"serve", "scaling"})
        if unknown:
            raise config.SettingsError(f"unknown build_app argument(s) {unknown}; known: serve, scaling")
        serve_settings = config.load_settings(args.get("serve") or {})
        if (serve_settings.api_processes or 1) > 1:
            raise config.SettingsError(
                "api_processes applies to `medgemma-serve serve`; a Ray Serve replica is one API "
                "process in front of its engine: add replicas instead"
            )
        try:
            scaling = ScalingSettings(**(args.get("scaling") or {}))
        except ValidationError as exc:
            raise config.SettingsError(layers.explain_validation(exc, ScalingSettings, "", "scaling settings")) from None
        return cls(serve=serve_settings, scaling=scaling)


def autoscaling_config(scaling: ScalingSettings, capacity_units: float) -> dict[str, Any]:
    return {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": scaling.initial_replicas,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        "look_back_period_s": scaling.look_back_period_s,
        "metrics_interval_s": scaling.metrics_interval_s,
        "policy": {
            "policy_function": "serving.autoscale:CostUnitsPolicy",
            "policy_kwargs": {"target_utilisation": scaling.target_utilisation, "capacity_units": capacity_units},
        },
    }


def deployment_options(settings: AppSettings) -> dict[str, Any]:
    """Ray Serve options of the engine deployment (a pure function of the settings)."""
    from serving import engine

    serve_settings, scaling = settings.serve, settings.scaling
    profile = engine.PROFILES.get(serve_settings.profile or "")
    on_cpu = profile is not None and profile.device == "cpu"
    resources = scaling.replica_resources or ({"CPU": 1.0} if on_cpu else {"GPU": 1.0})
    actor_options: dict[str, Any] = {"num_cpus": resources.get("CPU", 0.0), "num_gpus": resources.get("GPU", 0.0)}
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    if custom:
        actor_options["resources"] = custom
    # The real figure comes from each replica (its engine sizes max_num_seqs from GPU memory).
    max_num_seqs = serve_settings.max_num_seqs or (profile.max_num_seqs_cap if profile else 64)
    return {
        "name": DEPLOYMENT_NAME,
        "autoscaling_config": autoscaling_config(scaling, float(max_num_seqs)),
        # Our admission layer queues and refuses; Ray must never queue in front of it.
        "max_ongoing_requests": max_num_seqs * 4 + serve_settings.queue_size,
        "ray_actor_options": actor_options,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_wait_loop_s": 2.0,
        "graceful_shutdown_timeout_s": serve_settings.drain_timeout_s + SHUTDOWN_MARGIN_S,
    }


def build_app(args: dict[str, Any] | None = None):
    """The Ray Serve application for ``args`` (``{"serve": {...}, "scaling": {...}}``)."""
    from ray import serve

    settings = AppSettings.from_args(args)
    if (args or {}).get("serve", {}).get("redis_password") is not None:
        raise config.SettingsError(
            "redis_password cannot be a build_app argument (Ray would store it in the "
            "deployment config): set MEDGEMMA_REDIS_PASSWORD on the replicas (a Secret)"
        )
    replica = serve.deployment(serve.ingress()(MedGemmaReplica))
    # Secrets stay out of Ray's deployment config: each replica reads them from its environment.
    serve_args = settings.serve.model_dump(mode="json", exclude={"redis_password"})
    return replica.options(**deployment_options(settings)).bind(serve_args)


def direct_ingress_ports() -> range:
    """The ports Ray Serve may give this node's replicas (it allocates from range(min, max))."""
    from ray.serve._private import constants

    return range(constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT)


def exit_failed_replica() -> None:
    """The engine died or hung and its requests have been ended: stop this replica's
    process now, engine included, so Ray replaces it at once (not after three failed health
    checks) and its port and GPU are free for the replacement. A hung (stopped) engine
    would never exit on its own and would keep the GPU's memory."""
    import psutil

    logger.error("engine failed: exiting this replica so that Ray replaces it")
    for handler in logging.getLogger("serving").handlers:
        handler.flush()
    from serving.usage.writer import close_all

    close_all()  # the usage records of the requests just ended
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(1)


class MedGemmaReplica:
    """One engine replica: the product server's app on a Ray Serve replica."""

    async def __init__(self, serve_settings: dict[str, Any]):
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

        from serving import hardware
        from serving.assembly import build_served_app, prepare_server
        from serving.logs import configure_logging
        from serving.vllm_app import parse_vllm_args

        settings = config.ServeSettings(**serve_settings)
        configure_logging(settings.log_level.upper())
        resolved = config.resolve(settings, hardware.detect_gpu(), serving=True)
        from serving.usage.destination import REPLICA_USAGE_FILE

        # replicas may share a host: each writes its own usage file
        vllm_argv, self.context = prepare_server(settings, resolved, usage_file=REPLICA_USAGE_FILE)
        args = parse_vllm_args(vllm_argv)
        self._drained = asyncio.Event()
        self._engine = build_async_engine_client(args)
        self.engine_client = await self._engine.__aenter__()
        self.served_app = await build_served_app(
            args, self.context, self.engine_client, on_drained=self._drained.set, on_engine_failed=exit_failed_replica
        )
        from serving.sockets import wait_for_ports

        await wait_for_ports(settings.host, direct_ingress_ports())  # the predecessor's port too
        logger.info("replica ready: %s, profile %s", resolved.served_model_name, resolved.profile)

    def __serve_build_asgi_app__(self):
        return self.served_app

    def _limit_unsent(self) -> None:
        """Ray Serve binds the replica's port after ``__init__``: cap its unsent bytes on
        the first look that finds it (``serving.sockets``), so stalled readers are seen."""
        if getattr(self, "_unsent_limited", False):
            return
        from serving.sockets import limit_unsent_listeners

        self._unsent_limited = limit_unsent_listeners(direct_ingress_ports())

    def record_autoscaling_stats(self) -> dict[str, float]:
        self._limit_unsent()
        controller = self.served_app.state.medgemma.admission.controller
        return {DEMAND: float(controller.demand_units()), CAPACITY: float(controller.capacity_units)}

    async def check_health(self) -> None:
        if self.context.health.failed:
            raise RuntimeError("the engine died or hung; this replica must be replaced")

    async def __del__(self):
        served = getattr(getattr(getattr(self, "served_app", None), "state", None), "medgemma", None)
        if served is not None and not self.context.health.failed:
            served.drainer.begin()
            await self._drained.wait()
        if getattr(self, "context", None) is not None:
            self.context.health.stop()
        if getattr(self, "_engine", None) is not None:
            await self._engine.__aexit__(None, None, None)


def run(app_args: dict[str, Any], *, address: str | None = None, temp_dir: str | None = None,
        num_cpus: int | None = None) -> int:  # fmt: skip
    """``medgemma-serve ray``: start (or join) a Ray cluster, deploy the app, serve until
    SIGINT/SIGTERM, then drain the replicas and stop."""
    import signal
    import threading

    settings = AppSettings.from_args(app_args)  # refused before Ray starts
    # Replicas answer HTTP themselves (no Ray proxy on the token path); every Ray process
    # started from here inherits this.
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    # A replacement takes its predecessor's port at once (Ray holds released ports for a
    # minute by default, for its HAProxy mode, which this app does not use).
    os.environ.setdefault("RAY_SERVE_PORT_QUARANTINE_S", "0")
    import ray
    from ray import serve

    ray.init(address=address, num_cpus=num_cpus, _temp_dir=temp_dir, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location="Disabled", http_options={"host": settings.serve.host})
        serve.run(build_app(app_args), name=DEPLOYMENT_NAME, route_prefix="/")
        logger.info(
            "serving %s on Ray: replicas answer on %s:%s and up (direct ingress), %d-%d replicas",
            settings.serve.served_model_name, settings.serve.host,
            os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"),
            settings.scaling.min_replicas, settings.scaling.max_replicas,
        )  # fmt: skip
        stop.wait()
        logger.info("stopping: draining the replicas (at most %.0fs)", settings.serve.drain_timeout_s)
        serve.delete(DEPLOYMENT_NAME)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
