"""The one attachment point to vLLM's app and server set-up, checked against vLLM 0.32 itself."""

import ast
import asyncio
import inspect
import textwrap

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from serving.vllm_app import limit_openapi, replace_route, serve_http_options, wrap_app


async def call(app, path: str):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b"",
             "root_path": "", "scheme": "http", "server": ("t", 80), "client": ("t", 1)}  # fmt: skip
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def built_app():
    """A FastAPI app shaped like vLLM's: its own middleware, its stack already built."""
    app = FastAPI()
    seen = []

    @app.middleware("http")
    async def vllm_middleware(request, call_next):
        seen.append(("vllm", request.url.path))
        return await call_next(request)

    @app.get("/health")
    async def vllm_health():
        return JSONResponse({"from": "vllm"})

    app.middleware_stack = app.build_middleware_stack()  # what vLLM's start-up leaves behind
    return app, seen


def test_the_wrapper_runs_first_on_every_request_and_vllm_stack_still_runs():
    async def scenario():
        app, seen = built_app()

        def wrap(inner):
            async def layer(scope, receive, send):
                seen.append(("ours", scope["path"]))
                await inner(scope, receive, send)

            return layer

        layer = wrap_app(app, wrap)
        assert app.middleware_stack is layer
        status, _ = await call(app, "/health")
        assert status == 200 and seen == [("ours", "/health"), ("vllm", "/health")]

    asyncio.run(scenario())


def test_replace_route_serves_ours_in_place_of_vllms_and_openapi_is_limited():
    async def scenario():
        app = FastAPI()

        @app.get("/health")
        async def vllm_health():
            return {"from": "vllm"}

        @app.get("/tokenize")
        async def tokenize():
            return {}

        @app.get("/v1/models")
        async def models():
            return {}

        async def ours():
            return JSONResponse({"from": "us"})

        replace_route(app, "/health", ours)
        limit_openapi(app, frozenset({"/health", "/v1/models"}))
        assert len([r for r in app.router.routes if getattr(r, "path", None) == "/health"]) == 1
        status, body = await call(app, "/health")
        assert (status, body) == (200, b'{"from":"us"}')
        assert set(app.openapi()["paths"]) == {"/v1/models"}  # /tokenize is cut; ours is not in the schema

    asyncio.run(scenario())


def _serve_http_keywords_in_vllm() -> dict[str, ast.expr]:
    """The keywords vLLM 0.32's ``build_and_serve`` passes to ``serve_http``, by name."""
    from vllm.entrypoints.launchers.api_server import entry

    tree = ast.parse(textwrap.dedent(inspect.getsource(entry.build_and_serve)))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "serve_http"]
    assert len(calls) == 1, "vLLM's build_and_serve no longer calls serve_http once: re-read it"
    return {k.arg: k.value for k in calls[0].keywords if k.arg is not None}


def test_our_serve_http_options_are_the_ones_vllm_passes():
    """A copy of vLLM's call: this fails when vLLM changes what it passes to serve_http."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.launchers.launcher import serve_http
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm import envs

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", "--port", "8123"])
    ours = serve_http_options(args)
    ours.pop("log_config", None)  # only when vLLM has one
    theirs = _serve_http_keywords_in_vllm()
    assert set(ours) | {"sock", "peer_loads"} == set(theirs)
    for name, expr in theirs.items():  # and each is the value vLLM would pass
        if name not in ("sock", "peer_loads"):
            value = eval(compile(ast.Expression(expr), "<vllm>", "eval"), {"args": args, "envs": envs})  # noqa: S307
            assert ours[name] == value, name
    params = inspect.signature(serve_http).parameters
    assert {"app", "sock", "enable_ssl_refresh"} <= set(params)
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
