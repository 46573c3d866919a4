"""vLLM takes the guard's parse of a body: the same objects ``json.loads`` would give, used
once, for the same bytes only, through Starlette's and FastAPI's real body parsing."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import msgspec
import pytest
import starlette.requests
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

from serving.admission import handoff
from serving.admission.guard import RequestGuard
from serving.admission.priority import with_priority


def same(a, b) -> bool:
    """Equal, with the same types throughout (``1 == 1.0 == True`` does not count) and the
    same key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(JSON_VALUES, st.booleans(), st.booleans())
def test_wherever_the_guard_decodes_a_body_json_loads_gives_the_same_objects(value, ascii_only, spaced):
    body = json.dumps({"v": value, "model": "m"}, ensure_ascii=ascii_only,
                      separators=(", ", ": ") if spaced else (",", ":")).encode()  # fmt: skip
    assert same(RequestGuard.parse(body), json.loads(body))


@pytest.mark.parametrize("text", [
    '{"a": 123456789012345678901234567890}', '{"a": -9223372036854775809}', '{"a": 18446744073709551616}',
    '{"a": -0}', '{"a": -0.0}', '{"a": 0e0}', '{"a": 1E+2}', '{"a": 1e308}', '{"a": 1e-400}', '{"a": 5e-324}',
    '{"a": 1.0000000000000000000001}', '{"a": 0.1}', '{"a": "\\ud83d\\ude00"}', '{"a": "\\u0000\\/\\b"}',
    '{"a": 1, "a": 2}', '{"a": 1, "b": 2, "a": 3}', '{"a": "é\u2028"}', ' {"a": [1, {"b": null}]} \n',
])  # fmt: skip
def test_edge_cases_decode_the_same_or_are_refused(text):
    body = text.encode()
    try:
        parsed = RequestGuard.parse(body)
    except Exception:  # noqa: BLE001 - refused: vLLM never sees it
        return
    assert same(parsed, json.loads(body))


@pytest.mark.parametrize("text", ['{"model": "m"}', '{}', '{"priority": 7, "model": "m"}', '{"model": "m", "priority": -3} '])
def test_the_priority_set_on_the_parse_is_what_a_parser_reads_from_the_appended_key(text):
    parsed = RequestGuard.parse(text.encode())
    parsed["priority"] = 2
    assert same(parsed, json.loads(with_priority(text.encode(), 2)))


@pytest.fixture
def installed(monkeypatch):
    monkeypatch.setattr(starlette.requests, "json", json)  # restored after the test
    assert handoff.install() and handoff.install()  # idempotent
    assert isinstance(starlette.requests.json, handoff.HandedJson)
    calls = []
    real = json.loads

    def spy(text, **kwargs):
        calls.append(len(text))
        return real(text, **kwargs)

    monkeypatch.setattr(json, "loads", spy)
    return calls


def test_a_handed_parse_is_used_once_for_equal_bytes_only(installed):
    body = b'{"model": "m", "n": 1}'
    parsed = {"model": "m", "n": 1}
    loads = starlette.requests.json.loads

    def in_request():
        handoff.hand_over(body, parsed)
        assert loads(b'{"model": "m", "n": 2}') == {"model": "m", "n": 2}  # other bytes: parsed
        assert loads(bytes(body)) is parsed  # equal bytes, another object: handed over
        again = loads(body)
        assert again == parsed and again is not parsed  # once only
        return True

    import contextvars

    assert contextvars.copy_context().run(in_request)
    assert loads(body) is not parsed  # outside the request's context: parsed
    assert installed == [22, 22, 22]
    assert starlette.requests.json.JSONDecodeError is json.JSONDecodeError  # the rest is json's


def test_a_starlette_without_the_standard_json_is_left_alone(monkeypatch):
    other = object()
    monkeypatch.setattr(starlette.requests, "json", other)
    assert handoff.install() is False
    assert starlette.requests.json is other


class ChatLike(BaseModel):  # vLLM's request models: pydantic, extra fields kept
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[dict]


def test_fastapi_validates_the_handed_parse_and_does_not_parse_the_body_again(installed):
    from fastapi import FastAPI

    app = FastAPI()
    seen = {}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatLike):
        seen["request"] = request
        return {"ok": True}

    url = "data:image/png;base64," + "A" * 300_000  # a body of megabytes in production
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url",
                      "image_url": {"url": url}}]}], "priority": 1}).encode()  # fmt: skip

    async def front(scope, receive, send):  # what the admission middleware does before vLLM
        handoff.hand_over(body, RequestGuard.parse(body))
        await app(scope, receive, send)

    async def run():
        transport = httpx.ASGITransport(app=front)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})

    response = asyncio.run(run())
    assert response.status_code == 200, response.text
    assert seen["request"].messages[0]["content"][0]["image_url"]["url"] == url
    assert seen["request"].priority == 1
    assert len(body) not in installed  # FastAPI never parsed the body's bytes
    assert msgspec.json.decode(response.content) == {"ok": True}


def test_vllms_own_chat_route_takes_the_handed_parse(installed):
    """vLLM 0.32's chat route, its request model and its decorators, on FastAPI: the body
    reaches the handler validated from the handed parse; its bytes are never parsed."""
    from fastapi import FastAPI
    from vllm.entrypoints.openai.chat_completion.api_router import router
    from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

    seen = {}

    class Chat:  # stands in for OpenAIServingChat: what the route hands it
        async def create_chat_completion(self, request, raw_request):
            seen["request"] = request
            return ErrorResponse(error=ErrorInfo(message="seen", type="test", param=None, code=418))

    app = FastAPI()
    app.include_router(router)
    app.state.openai_serving_chat = Chat()
    url = "data:image/png;base64," + "A" * 300_000
    body = with_priority(json.dumps({"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}]}).encode(), -1)  # fmt: skip

    async def front(scope, receive, send):
        parsed = RequestGuard.parse(body)
        parsed["priority"] = -1
        handoff.hand_over(body, parsed)
        await app(scope, receive, send)

    async def run():
        transport = httpx.ASGITransport(app=front)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})

    response = asyncio.run(run())
    assert response.status_code == 418, response.text
    request = seen["request"]
    assert request.max_tokens == 3 and request.priority == -1
    assert request.messages[0]["content"][0]["image_url"]["url"] == url
    assert len(body) not in installed  # the route's body was never parsed from its bytes
