"""Short text prompts render on the event loop: vLLM's own executor and make_async wrappers,
the real admission middleware marking requests."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from types import SimpleNamespace

import pytest

from serving.admission import inline_render
from serving.admission.inline_render import render_inline, render_short_prompts_inline

MAX_BYTES = 4096


@pytest.fixture
def renderer():
    """vLLM 0.32's renderer executor with a wrapper bound before the swap, as vLLM binds them."""
    from vllm.renderers.base import _SwappableExecutor
    from vllm.utils.async_utils import make_async

    executor = _SwappableExecutor(max_workers=1)
    where = make_async(lambda: threading.get_ident(), executor=executor)
    fail = make_async(lambda: 1 / 0, executor=executor)
    yield SimpleNamespace(_executor=executor, where=where, fail=fail)
    executor.shutdown(wait=True)


def test_a_marked_request_runs_on_the_loops_thread_and_others_on_vllms_pool(renderer):
    assert render_short_prompts_inline(SimpleNamespace(renderer=renderer), MAX_BYTES) == MAX_BYTES

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


def test_an_inline_failure_reaches_the_caller_as_the_pools_would(renderer):
    render_short_prompts_inline(SimpleNamespace(renderer=renderer), MAX_BYTES)

    async def failure(inline: bool) -> type:
        render_inline.set(inline)
        try:
            await renderer.fail()
        except ZeroDivisionError as exc:
            return type(exc)
        return type(None)

    assert asyncio.run(failure(True)) is asyncio.run(failure(False)) is ZeroDivisionError


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
    from tests.unit.admission.test_middleware import Client, build, request

    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    body = {"model": "medgemma-4b-it", "max_tokens": 3, **body}
    if not expect and "IMAGE" in str(body):
        body["messages"][0]["content"][0]["image_url"]["url"] = tiny_png()
    seen = []

    async def app(scope, receive, send):
        seen.append(render_inline.get())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scenario():
        mw, controller, _ = build(app, max_model_len=100_000)
        mw.inline_max_bytes = MAX_BYTES  # as build_admission passes --inline-render-max-kib
        scope, payload = request(body, path=path)
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        return client

    client = asyncio.run(scenario())
    assert client.status == 200, client.sent
    assert seen == [expect]
    assert inline_render.render_inline.get() is False  # this test's own context never changed
