"""The responder that answers while the engine loads (pure ASGI, no engine)."""

import asyncio
import json

from serving.launcher import LOADING_RETRY_AFTER_S, loading_app


def call(path: str):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    asyncio.run(loading_app(scope, receive, send))
    start, body = sent
    return start["status"], dict(start["headers"]), json.loads(body["body"])


def test_health_is_alive_while_loading():
    status, _, body = call("/health")
    assert status == 200 and body == {"status": "loading"}


def test_ready_is_503_while_loading():
    status, _, body = call("/ready")
    assert status == 503 and body == {"status": "loading"}


def test_model_endpoints_get_an_openai_error_with_retry_after():
    status, headers, body = call("/v1/chat/completions")
    assert status == 503
    assert headers[b"retry-after"] == str(LOADING_RETRY_AFTER_S).encode()
    assert body["error"]["code"] == "model_loading"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_a_shutdown_after_the_engine_died_is_a_failure_and_a_clean_one_is_not():
    from serving.assembly import ServerContext, watch_shutdown

    class Engine:
        errored = False
        stopped = 0

        def shutdown(self, timeout=None):
            self.stopped += 1

    for errored, failed in ((False, False), (True, True)):
        engine, context = Engine(), ServerContext("cpu-dev", "m", "m", metrics=None, admission=None)
        context.health.watch_errored(lambda: engine.errored)
        watch_shutdown(engine, context.health)
        engine.errored = errored  # vLLM's watchdog stops the server on a dead engine
        engine.shutdown(timeout=0)
        assert (context.health.stopping, context.health.failed, engine.stopped) == (True, failed, 1)
        engine.errored = True  # a clean shutdown stops the engine: that is not a failure
        engine.shutdown()
        assert context.health.failed is failed
