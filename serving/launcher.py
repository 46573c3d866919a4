"""Runs vLLM's OpenAI-compatible server process for ``medgemma-serve serve``.

Guarantees:
- No policy lives here: the server is put together by ``serving.assembly`` (the same code
  the Ray replica runs); this module runs it under vLLM's own uvicorn set-up.
- The port answers from the moment it is bound: while the engine loads (minutes for the
  real model), ``/health`` is 200 (the process is alive), ``/ready`` is 503 and model
  endpoints return an OpenAI-style 503 ``model_loading`` with ``Retry-After``.
- Once the engine is up, vLLM's own app with our layers (``assembly.build_served_app``)
  serves every endpoint in the same process: no extra network hop. SIGTERM is a drain.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from typing import Any

from serving.assembly import ServerContext, build_served_app
from serving.engine import REFUSED_DTYPES
from serving.sockets import limit_unsent
from serving.vllm_app import parse_vllm_args, serve_http_options

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER_S = 10


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


async def run_server(args, context: ServerContext) -> None:
    """vLLM's single-process API server (``run_server_worker``) with our hooks in it."""
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server

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
            drainer = app.state.medgemma.drainer
            # Runs once serve_http (below) has installed vLLM's signal handlers: SIGTERM
            # becomes a graceful drain, SIGINT stays vLLM's immediate shutdown.
            asyncio.get_running_loop().call_soon(drainer.install, asyncio.get_running_loop())
            responder.stop()
            logger.info("engine ready: serving %s on %s", context.served_model_name, listen_address)
            shutdown_task = await serve_http(app, sock=sock, **serve_http_options(args))
        await shutdown_task
    finally:
        responder.stop()
        sock.close()


def parse_for_serving(vllm_argv: list[str]):
    """vLLM's environment set-up, parser and logging for a server; refuses float16."""
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    args = parse_vllm_args(vllm_argv)
    if str(args.dtype).lower() in REFUSED_DTYPES:
        # engine.validate refuses fp16 given as a flag; this catches what it cannot see,
        # such as a dtype inside a vLLM --config file.
        raise SystemExit("medgemma-serve: --dtype float16 is refused for Gemma 3; use bfloat16")
    configure_logging_from_args(args)
    return args


def serve(vllm_argv: list[str], context: ServerContext) -> None:
    """Parse ``vllm_argv`` with vLLM's parser and run the server until it is told to stop."""
    import uvloop

    args = parse_for_serving(vllm_argv)
    uvloop.run(run_server(args, context))
    if context.health.failed:
        raise SystemExit(1)  # the engine died or hung: let the orchestrator restart us
