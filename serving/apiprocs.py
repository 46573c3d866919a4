"""Several API processes in front of one engine (``--api-processes N``).

For an image model the API process decodes and preprocesses every image before the engine
sees it, on one core: a GPU can take far more image requests per second than one such
process prepares (docs/images.md). This runs vLLM 0.32's own multi-server mode
(``vllm/entrypoints/cli/serve.py`` ``run_multi_api_server``) with this project's server in
every API process.

Guarantees:
- One listening socket, shared by N spawned API processes; vLLM's server hands each new
  connection to the process with the fewest open ones. One EngineCore, the parent's child.
  The parent watches them all and exits non-zero when one of them fails.
- Every API process runs the whole server of ``serving.assembly`` (admission, probes, the
  drain, the engine watch). Budgets are exact across them through one ``HostLedger``
  (``/dev/shm``; Redis instead when configured); the engine's capacity is split between
  them (``serving.admission.build.share``). Slots come from vLLM's server index, never
  from process ids.
- While the engine loads, the parent answers on the port (``LoadingResponder``).
- SIGTERM: vLLM's parent sends it to every API process, each drains; the parent waits
  the drain timeout plus a margin before it kills. SIGHUP (reload the keys) goes to every
  API process.
- Metrics: vLLM's ``PROMETHEUS_MULTIPROC_DIR``; any process's ``/metrics`` has them all
  (``serving.metrics``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from serving import config, engine
from serving.admission.host_ledger import HostLedgerFile
from serving.assembly import build_served_app, context_for_api_process
from serving.launcher import LoadingResponder, parse_for_serving
from serving.logs import configure_logging
from serving.sockets import limit_unsent
from serving.vllm_app import serve_http_options

logger = logging.getLogger(__name__)

SHUTDOWN_MARGIN_S = 30  # beyond the drain timeout, before vLLM's parent kills an API process


@dataclass(frozen=True)
class ApiProcessSpec:
    """What every API process builds its server from (pickled into spawned processes)."""

    settings: config.ServeSettings
    resolved: engine.EngineSettings
    host_ledger: Path
    count: int


def serve_processes(vllm_argv: list[str], settings: config.ServeSettings, resolved: engine.EngineSettings,
                    count: int) -> None:  # fmt: skip
    """Run the engine and ``count`` API processes until told to stop."""
    import vllm
    from vllm.entrypoints.launchers.launcher import setup_server
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
    from vllm.v1.executor import Executor
    from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus
    from vllm.v1.utils import APIServerProcessManager, wait_for_completion_or_failure

    args = parse_for_serving(vllm_argv)
    # vLLM's parent stops its API processes with this timeout: they must be able to drain
    args.shutdown_timeout = max(args.shutdown_timeout or 0, int(settings.drain_timeout_s) + SHUTDOWN_MARGIN_S)
    setup_multiprocess_prometheus()  # before any API process starts: they inherit it
    manager = ledger = None
    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        if not stopping:  # a second signal does not cut the shutdown short
            stopping = True
            raise SystemExit(0)

    def reload_keys(_signum, _frame) -> None:
        for process in manager.processes if manager is not None else ():
            if process.is_alive():
                os.kill(process.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload_keys)
    listen_address, sock = setup_server(args, reuse_port=True)
    limit_unsent(sock)
    responder = LoadingResponder(sock)
    engines = coordinator = listeners = vllm_config = None
    try:
        responder.start()
        logger.info("listening on %s with %d API processes; /ready turns 200 once the engine has loaded",
                    listen_address, count)  # fmt: skip
        engine_args = vllm.AsyncEngineArgs.from_cli_args(args)
        engine_args._api_process_count = count
        engine_args._api_process_rank = -1
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        ledger = HostLedgerFile.create(slots=count)
        spec = ApiProcessSpec(settings, resolved, ledger.path, count)
        listeners = bind_engine_zmq_listeners(vllm_config, count)
        with launch_core_engines(vllm_config, Executor.get_class(vllm_config), not engine_args.disable_log_stats,
                                 listeners.addresses) as launch:  # fmt: skip
            engines, coordinator = launch.engine_manager, launch.coordinator
            manager = APIServerProcessManager(
                listen_address=listen_address,
                sock=sock,
                args=args,
                num_servers=count,
                input_listeners=listeners.inputs,
                output_listeners=listeners.outputs,
                target_server_fn=_ApiProcessTarget(spec),
                stats_update_address=coordinator.get_stats_publish_address() if coordinator else None,
                tensor_queue=launch.tensor_queue,
            )
            launch.watched_frontend_processes = manager.processes
        responder.stop()  # the engine is up: the API processes take the port over
        colocate_engine_core_if_cpu()
        wait_for_completion_or_failure(api_server_manager=manager, engine_manager=engines, coordinator=coordinator)
    finally:
        requested, stopping = stopping, True  # from here on SIGTERM and SIGINT are ignored
        responder.stop()
        # asked to stop: the API processes drain; a failure: vLLM's short default
        timeout = vllm_config.shutdown_timeout if vllm_config is not None and requested else None
        if manager is not None:
            manager.shutdown(timeout=timeout)
        if engines is not None:
            engines.shutdown(timeout=timeout)
        if coordinator is not None:
            coordinator.shutdown(timeout=timeout)
        if ledger is not None:
            ledger.remove()
        sock.close()
        listeners = None  # closed now, while the interpreter is whole (vLLM's __del__ needs it)


def colocate_engine_core_if_cpu() -> None:
    """vLLM CPU: the EngineCore is this process's child here (serving/cpuaffinity.py)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from serving.cpuaffinity import colocate_engine_core

        colocate_engine_core()


class _ApiProcessTarget:
    """What vLLM's ``APIServerProcessManager`` starts in each spawned process."""

    def __init__(self, spec: ApiProcessSpec):
        self.spec = spec

    def __call__(self, listen_address, sock, args, client_config=None) -> None:
        import uvloop
        from vllm.utils.system_utils import decorate_logs, set_process_title

        # the parent forwards SIGHUP (reload the keys): until this process's key reloader
        # takes it over, and for good without a keys file, it must not end the process
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        client_config = client_config or {}
        index = client_config.get("client_index", 0)
        set_process_title("APIServer", str(index))
        decorate_logs()
        configure_logging(self.spec.settings.log_level.upper(), process=f"api{index}")
        spec = self.spec
        context = context_for_api_process(spec.settings, spec.resolved, index, spec.count, spec.host_ledger)
        uvloop.run(_serve(listen_address, sock, args, client_config, context))
        if context.health.failed:
            raise SystemExit(1)  # the engine died or hung: the parent shuts everything down


async def _serve(listen_address, sock, args, client_config: dict, context) -> None:
    """vLLM's ``run_server_worker`` with this project's server in it."""
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import serve_http

    peer_loads = None
    if "api_server_loads" in client_config:
        peer_loads = (client_config.pop("api_server_loads"), client_config["client_index"])
    try:
        async with build_async_engine_client(args, client_config=client_config) as engine_client:
            app = await build_served_app(args, context, engine_client)
            loop = asyncio.get_running_loop()
            loop.call_soon(app.state.medgemma.drainer.install, loop)  # after serve_http's handlers
            logger.info("API process %d ready: serving %s on %s", client_config.get("client_index", 0),
                        context.served_model_name, listen_address)  # fmt: skip
            shutdown_task = await serve_http(app, sock=sock, peer_loads=peer_loads, **serve_http_options(args))
        await shutdown_task
    finally:
        sock.close()
