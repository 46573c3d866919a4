"""Short text prompts render on the event loop: vLLM's own executor and make_async wrappers,
the real admission middleware marking requests."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter

from serving.admission import inline_render
from serving.admission.inline_render import render_inline, render_short_prompts_inline

MAX_BYTES = 4096


@pytest.fixture
def renderer():
    """vLLM 0.32's renderer executor with a wrapper bound before the swap, as vLLM binds them."""
    from vllm.renderers.base import _SwappableExecutor
    from vllm.utils.async_utils import make_async

    def fail():
        raise RuntimeError(threading.get_ident())  # says where it ran

    executor = _SwappableExecutor(max_workers=1)
    where = make_async(lambda: threading.get_ident(), executor=executor)
    yield SimpleNamespace(_executor=executor, where=where, fail=make_async(fail, executor=executor))
    executor.shutdown(wait=True)


def test_a_marked_request_runs_on_the_loops_thread_and_others_on_vllms_pool(renderer):
    jobs = Counter("jobs", "inline jobs", registry=CollectorRegistry())
    assert render_short_prompts_inline(SimpleNamespace(renderer=renderer), MAX_BYTES, jobs) == MAX_BYTES

    async def scenario():
        loop_thread = threading.get_ident()

        async def request(inline: bool) -> int:
            render_inline.set(inline)
            return await renderer.where()

        marked, unmarked = await asyncio.gather(asyncio.create_task(request(True)), asyncio.create_task(request(False)))
        outside = await renderer.where()  # warm-up, cache resets: no request, the pool
        return loop_thread, marked, unmarked, outside

    loop_thread, marked, unmarked, outside = asyncio.run(scenario())
    assert marked == loop_thread
    assert unmarked != loop_thread and outside != loop_thread
    assert jobs._value.get() == 1  # the marked one only


def test_an_inline_failure_reaches_the_caller_as_the_pools_would(renderer):
    render_short_prompts_inline(SimpleNamespace(renderer=renderer), MAX_BYTES)

    async def failure(inline: bool) -> tuple[int, int | None]:
        render_inline.set(inline)
        try:
            await renderer.fail()
        except RuntimeError as exc:
            return threading.get_ident(), exc.args[0]
        return threading.get_ident(), None

    loop_thread, raised_on = asyncio.run(failure(True))
    assert raised_on == loop_thread  # raised inline, and reached the caller
    loop_thread, raised_on = asyncio.run(failure(False))
    assert raised_on is not None and raised_on != loop_thread  # raised on the pool, and reached the caller


def test_the_pool_swapped_after_a_render_timeout_still_serves_unmarked_work(renderer):
    render_short_prompts_inline(SimpleNamespace(renderer=renderer), MAX_BYTES)
    renderer._executor.replace_inner()  # what vLLM does after a chat template timed out

    async def unmarked() -> int:
        return await renderer.where()

    assert asyncio.run(unmarked()) != threading.get_ident()


def test_zero_leaves_vllms_executor_as_it_is(renderer):
    submit = renderer._executor.submit
    assert render_short_prompts_inline(SimpleNamespace(renderer=renderer), 0) == 0
    assert renderer._executor.submit == submit


def test_a_renderer_of_another_shape_is_left_alone(caplog):
    assert render_short_prompts_inline(SimpleNamespace(renderer=SimpleNamespace()), MAX_BYTES) == 0
    assert "keep vLLM's renderer thread" in caplog.text


def tiny_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (32, 32), 120).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ({"messages": [{"role": "user", "content": "Chest pain, normal ECG."}]}, True),
        ({"messages": [{"role": "user", "content": "x " * MAX_BYTES}]}, False),  # long: vLLM's thread
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMAGE"}},
                                                    {"type": "text", "text": "What is this?"}]}]}, False),  # fmt: skip
        ({"prompt": ["a b", "c"]}, True),
    ],
    ids=["short-text", "long-text", "image", "batched-completion"],
)
def test_the_middleware_marks_short_text_requests_only(body, expect):
    """The real admission middleware: what vLLM's route sees of the mark."""
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    body = {"model": "medgemma-4b-it", "max_tokens": 3, **body}
    if not expect and "IMAGE" in str(body):
        body["messages"][0]["content"][0]["image_url"]["url"] = tiny_png()
    assert mark_seen(json.dumps(body).encode(), path) is expect
    assert inline_render.render_inline.get() is False  # this test's own context never changed


def test_the_bound_is_the_body_the_client_sent_inclusive():
    short = json.dumps({"model": "medgemma-4b-it", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]})
    for size, expect in ((MAX_BYTES, True), (MAX_BYTES + 1, False)):
        body = short.encode()[:-1] + b" " * (size - len(short)) + b"}"  # the same document, padded
        assert len(body) == size and mark_seen(body) is expect, size


def mark_seen(payload: bytes, path: str = "/v1/chat/completions") -> bool:
    """What the app behind the real middleware (set up as build_admission sets it) reads of
    the mark for one request."""
    from tests.unit.admission.test_middleware import Client, build, request

    seen = []

    async def app(scope, receive, send):
        seen.append(render_inline.get())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scenario():
        mw, controller, _ = build(app, max_model_len=100_000)
        mw.inline_max_bytes = MAX_BYTES  # as build_admission passes --inline-render-max-kib
        scope, _ = request({}, path=path)
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        return client

    client = asyncio.run(scenario())
    assert client.status == 200, client.sent
    assert len(seen) == 1, seen
    return seen[0]
