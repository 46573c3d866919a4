"""The one place this project touches vLLM's OpenAI app and server set-up (vLLM 0.32).

Guarantees:
- ``parse_vllm_args``: vLLM's own API-server parser and validation for our vLLM argv.
- ``build_vllm_app``: vLLM's own app and state (``build_app`` + ``init_app_state``), as its
  ``build_and_serve`` makes them, over an engine we started.
- ``wrap_app``: an ASGI layer that runs before everything of vLLM's, in-process, on every
  request. vLLM builds the app's middleware stack before we get it (Starlette then refuses
  ``add_middleware``), so the built stack is wrapped; ``tests/unit/test_vllm_app.py`` checks
  this on a real Starlette app.
- ``replace_route``: our endpoint in place of vLLM's for one path (``/health``).
- ``serve_http_options``: the uvicorn options vLLM's ``build_and_serve`` gives ``serve_http``,
  for an app we built. It is a copy, so a test reads vLLM's own call and fails when its
  keywords change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def parse_vllm_args(argv: list[str]):
    """Parse an argument list with vLLM 0.32's own API-server parser (raises SystemExit on error)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm (via medgemma-serve)"))
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    return args


async def build_vllm_app(args, engine_client):
    """vLLM's OpenAI app over a running engine, with vLLM's own state initialised."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    supported_tasks = await engine_client.get_supported_tasks()
    app = build_app(args, supported_tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, supported_tasks)
    return app


def wrap_app(app, wrap: Callable[[Any], Any]) -> Any:
    """Put ``wrap(inner)`` in front of the app's whole middleware stack; returns the layer."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    layer = wrap(app.middleware_stack)
    app.middleware_stack = layer
    return layer


def replace_route(app, path: str, endpoint, methods: tuple[str, ...] = ("GET",)) -> None:
    """Serve ``path`` with ``endpoint`` instead of whatever vLLM registered there."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != path]
    app.add_api_route(path, endpoint, methods=list(methods), include_in_schema=False)


def limit_openapi(app, paths: frozenset[str]) -> None:
    """/openapi.json documents only ``paths`` (the routes the admission layer lets through)."""
    generate = app.openapi

    def openapi() -> dict:
        schema = generate()
        if set(schema.get("paths", {})) - paths:
            schema = {**schema, "paths": {p: v for p, v in schema["paths"].items() if p in paths}}
            app.openapi_schema = schema
        return schema

    app.openapi = openapi


def serve_http_options(args) -> dict[str, Any]:
    """The keyword arguments vLLM 0.32's ``build_and_serve`` passes to ``serve_http``
    (less ``sock`` and ``peer_loads``, which the caller owns)."""
    from vllm import envs
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    options: dict[str, Any] = {
        "enable_ssl_refresh": args.enable_ssl_refresh,
        "host": args.host,
        "port": args.port,
        "log_level": args.uvicorn_log_level,
        "access_log": not args.disable_uvicorn_access_log,
        "timeout_keep_alive": envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        "ssl_keyfile": args.ssl_keyfile,
        "ssl_certfile": args.ssl_certfile,
        "ssl_ca_certs": args.ssl_ca_certs,
        "ssl_cert_reqs": args.ssl_cert_reqs,
        "ssl_ciphers": args.ssl_ciphers,
        "h11_max_incomplete_event_size": args.h11_max_incomplete_event_size,
        "h11_max_header_count": args.h11_max_header_count,
    }
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        options["log_config"] = log_config
    return options
