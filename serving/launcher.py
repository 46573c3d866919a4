"""Starts vLLM's OpenAI-compatible server for MedGemma with our pieces attached.

Guarantees:
- No policy lives here: engine arguments come from ``serving.engine``, settings from
  ``serving.config``; this module only wires vLLM's own server together.
- The port answers from the moment it is bound: while the engine loads (minutes for the
  real model), ``/health`` is 200 (the process is alive), ``/ready`` is 503 and model
  endpoints return an OpenAI-style 503 ``model_loading`` with ``Retry-After``.
- Once the engine is up, vLLM's own app serves every endpoint; ``attach`` adds ``/ready``
  and our metrics, and is the single place where later layers (admission) plug in, as
  ASGI middleware in the same process: no extra network hop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from serving.admission.install import AdmissionSettings, install
from serving.admission.middleware import MODEL_PATHS, PUBLIC_PATHS
from serving.cpuaffinity import colocate_engine_core
from serving.drain import Drainer
from serving.enginewatch import EngineProgress, EngineWatch
from serving.engine import REFUSED_DTYPES
from serving.metrics import ServingMetrics
from serving.sockets import limit_unsent

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER_S = 10


@dataclass
class ServerContext:
    """What the attached layers share: resolved settings and the metrics registry."""

    profile: str
    model: str
    served_model_name: str
    metrics: ServingMetrics
    admission: AdmissionSettings
    drain_timeout_s: float = 120.0
    engine_hang_timeout_s: float = 120.0
    failed: bool = False  # the engine died or hung: the process exits 1
    stopping: bool = False  # an orderly shutdown (SIGINT, or the end of a drain) has begun


def context_from_settings(settings, resolved, keys) -> ServerContext:
    """The ServerContext for validated ``ServeSettings``, its resolved engine settings and
    the loaded keys (shared by ``medgemma-serve serve`` and the Ray Serve replica)."""
    from serving.admission.guard import GuardSettings

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
            engine_headroom=settings.engine_headroom,
            model_costs=settings.model_costs,
            redis_url=settings.redis_url,
            redis_password=settings.redis_password.get_secret_value() if settings.redis_password else None,
            redis_tls_ca_file=settings.redis_tls_ca_file,
            lease_ttl_s=settings.lease_ttl_s,
            redis_timeout_s=settings.redis_timeout_s,
            ledger_fallback=settings.ledger_fallback,
            stall_timeout_s=settings.stream_stall_timeout_s,
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


# --- while the engine loads -----------------------------------------------------------


def _json_response(status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()):
    payload = json.dumps(body).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *headers,
        ],
    }
    return start, {"type": "http.response.body", "body": payload}


async def loading_app(scope, receive, send) -> None:
    """ASGI app that answers while the engine loads."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path = scope.get("path", "")
    if path == "/health":
        start, body = _json_response(200, {"status": "loading"})
    elif path == "/ready":
        start, body = _json_response(503, {"status": "loading"})
    else:
        start, body = _json_response(
            503,
            {
                "error": {
                    "message": "The model is loading; retry shortly.",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "model_loading",
                }
            },
            [(b"retry-after", str(LOADING_RETRY_AFTER_S).encode())],
        )
    await send(start)
    await send(body)


class LoadingResponder:
    """Serves ``loading_app`` on a duplicate of the listening socket, in its own thread.

    A thread, because vLLM builds its engine synchronously on the main event loop.
    Closing the duplicate leaves the original socket listening for vLLM's server.
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock.dup()
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import uvicorn
        from vllm.entrypoints.launchers.launcher import NoSignalServer

        config = uvicorn.Config(loading_app, log_level="warning", access_log=False, lifespan="on")
        self._server = NoSignalServer(config)
        server = self._server

        def run() -> None:
            asyncio.run(server.serve(sockets=[self._sock]))

        self._thread = threading.Thread(target=run, name="medgemma-loading", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._sock.close()


# --- once the engine is up ------------------------------------------------------------


def attach(app, context: ServerContext) -> None:
    """Attach /ready, our metrics and the admission middleware to vLLM's FastAPI app."""
    from vllm.v1.engine.exceptions import EngineDeadError
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    engine_client = app.state.engine_client

    async def engine_state() -> str | None:
        if context.failed or app.state.admission.engine_failed:
            return "engine_failed"
        try:
            await engine_client.check_health()
        except EngineDeadError:
            return "engine_dead"
        return None

    async def ready(raw_request: Request) -> JSONResponse:
        """Readiness: 200 only while the engine can serve requests and no drain has begun."""
        if app.state.admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        failure = await engine_state()
        if failure is not None:
            return JSONResponse({"status": failure}, status_code=503)
        return JSONResponse({"status": "ready", "model": context.served_model_name})

    async def health(raw_request: Request) -> JSONResponse:
        """Liveness: 200 while the process and its engine work (also while draining);
        503 once the engine died or hung (the process exits right after)."""
        failure = await engine_state()
        if failure is not None:
            return JSONResponse({"status": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    # vLLM's /health knows a dead engine but not a hung one: ours replaces it.
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/health"]
    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ready", ready, methods=["GET"], include_in_schema=False)
    _limit_openapi(app)
    context.metrics.engine_ready.set_function(lambda: 0.0 if engine_client.errored else 1.0)
    get_prometheus_registry().register(context.metrics.registry)
    install(app, engine_client, context.admission, context.metrics)
    app.state.medgemma = context


def _mark_shutdown(engine_client, context: ServerContext) -> None:
    """Note when vLLM's shutdown stops the engine on purpose, so EngineWatch does not take
    the stopped engine for a failed one (and exit 1 after a clean drain). An engine that had
    already died when the shutdown began did fail: vLLM's own watchdog may stop the server
    before EngineWatch looks, and the process must still exit 1."""
    shutdown = engine_client.shutdown

    def shutdown_on_purpose(*args, **kwargs):
        if not context.stopping and engine_client.errored:
            context.failed = True
        context.stopping = True
        return shutdown(*args, **kwargs)

    engine_client.shutdown = shutdown_on_purpose


def _limit_openapi(app) -> None:
    """/openapi.json documents only the routes the middleware lets through."""
    generate = app.openapi
    served = MODEL_PATHS | PUBLIC_PATHS

    def openapi() -> dict:
        schema = generate()
        if set(schema.get("paths", {})) - served:
            schema = {**schema, "paths": {p: v for p, v in schema["paths"].items() if p in served}}
            app.openapi_schema = schema
        return schema

    app.openapi = openapi


async def build_served_app(
    args,
    context: ServerContext,
    engine_client,
    *,
    on_drained: Callable[[], None] | None = None,
    on_engine_failed: Callable[[], None] | None = None,
):
    """vLLM's OpenAI app over a running engine, with our layers attached and the drain and
    engine watch ready (shared by ``run_server`` and the Ray Serve replica).

    ``on_drained`` runs when a drain ends (default: SIGINT to this process, vLLM's own
    shutdown); ``on_engine_failed`` when the engine died or hung (default: the same)."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        colocate_engine_core()  # or its poll loop starves this process (serving/cpuaffinity.py)
    supported_tasks = await engine_client.get_supported_tasks()
    app = build_app(args, supported_tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, supported_tasks)
    attach(app, context)
    app.state.drainer = Drainer(
        grace_s=context.drain_timeout_s,
        set_draining=lambda: setattr(app.state.admission, "draining", True),
        busy=app.state.admission.busy,
        end_all=app.state.admission_middleware.end_all,
        shutdown=on_drained,
    )
    _mark_shutdown(engine_client, context)
    watch = EngineWatch(
        errored=lambda: engine_client.errored,
        controller=app.state.admission,
        middleware=app.state.admission_middleware,
        progress=EngineProgress(engine_client),
        on_failed=lambda: setattr(context, "failed", True),
        stopping=lambda: context.stopping,
        hang_timeout_s=context.engine_hang_timeout_s,
        shutdown=on_engine_failed,
    )
    app.state.engine_watch = asyncio.get_running_loop().create_task(watch.run())
    return app


async def run_server(args, context: ServerContext) -> None:
    """vLLM's single-process API server (``run_server_worker``) with our hooks in it."""
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    def interrupt_init(*_: Any) -> None:
        raise KeyboardInterrupt("terminated while loading")

    signal.signal(signal.SIGTERM, interrupt_init)
    listen_address, sock = setup_server(args, reuse_port=False)
    limit_unsent(sock)  # a client that stops reading blocks our send within 64 KiB
    responder = LoadingResponder(sock)
    responder.start()
    logger.info("listening on %s; /ready turns 200 once the engine has loaded", listen_address)
    try:
        async with build_async_engine_client(args) as engine_client:
            app = await build_served_app(args, context, engine_client)
            drainer = app.state.drainer
            # Runs once serve_http (below) has installed vLLM's signal handlers: SIGTERM
            # becomes a graceful drain, SIGINT stays vLLM's immediate shutdown.
            asyncio.get_running_loop().call_soon(drainer.install, asyncio.get_running_loop())
            responder.stop()
            logger.info("engine ready: serving %s on %s", context.served_model_name, listen_address)
            uvicorn_kwargs: dict[str, Any] = {}
            log_config = get_uvicorn_log_config(args)
            if log_config is not None:
                uvicorn_kwargs["log_config"] = log_config
            shutdown_task = await serve_http(
                app,
                sock=sock,
                enable_ssl_refresh=args.enable_ssl_refresh,
                host=args.host,
                port=args.port,
                log_level=args.uvicorn_log_level,
                access_log=not args.disable_uvicorn_access_log,
                timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
                ssl_keyfile=args.ssl_keyfile,
                ssl_certfile=args.ssl_certfile,
                ssl_ca_certs=args.ssl_ca_certs,
                ssl_cert_reqs=args.ssl_cert_reqs,
                ssl_ciphers=args.ssl_ciphers,
                h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
                h11_max_header_count=args.h11_max_header_count,
                **uvicorn_kwargs,
            )
        await shutdown_task
    finally:
        responder.stop()
        sock.close()


def parse_vllm_args(argv: list[str]):
    """Parse an argument list with vLLM 0.32's own API-server parser (raises SystemExit on error)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm (via medgemma-serve)"))
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    return args


def serve(vllm_argv: list[str], context: ServerContext) -> None:
    """Parse ``vllm_argv`` with vLLM's parser and run the server until it is told to stop."""
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.version import __version__ as vllm_version

    cli_env_setup()
    args = parse_vllm_args(vllm_argv)
    if str(args.dtype).lower() in REFUSED_DTYPES:
        # engine.validate refuses fp16 given as a flag; this catches what it cannot see,
        # such as a dtype inside a vLLM --config file.
        raise SystemExit("medgemma-serve: --dtype float16 is refused for Gemma 3; use bfloat16")
    configure_logging_from_args(args)
    context.metrics.set_build(
        profile=context.profile,
        model=context.model,
        served_model_name=context.served_model_name,
        vllm_version=vllm_version,
    )
    uvloop.run(run_server(args, context))
    if context.failed:
        raise SystemExit(1)  # the engine died or hung: let the orchestrator restart us
