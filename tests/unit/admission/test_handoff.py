"""vLLM takes the guard's parse of a body: the same objects ``json.loads`` would give, used
once, for the same bytes only, through Starlette's and FastAPI's real body parsing."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
import starlette.requests
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.admission import handoff
from serving.admission.guard import RequestGuard
from serving.admission.handoff import with_fields
from serving.admission.outcomes import AdmissionError, Outcome


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


ACCEPTED = [
    '{"a": 123456789012345678901234567890}', '{"a": -9223372036854775809}', '{"a": 18446744073709551616}',
    '{"a": -0}', '{"a": -0.0}', '{"a": 0e0}', '{"a": 1E+2}', '{"a": 1e308}', '{"a": 1e-400}', '{"a": 5e-324}',
    '{"a": 1.0000000000000000000001}', '{"a": 0.1}', '{"a": "\\ud83d\\ude00"}', '{"a": "\\u0000\\/\\b"}',
    '{"a": 1, "a": 2}', '{"a": 1, "b": 2, "a": 3}', '{"a": "é\u2028"}', ' {"a": [1, {"b": null}]} \n',
]  # fmt: skip
# What json.loads reads where the JSON standard does not (or reads differently): the guard
# refuses all of it, so vLLM never gets a parse that differs from its own.
REFUSED = [
    b'{"a": 1e400}', b'{"a": 1.7976931348623159e308}', b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}',
    b'{"a": "\\ud800"}', b'{"a": "\\udc00x"}', b'{"a": "\\ud83dx"}', b'{"a": "\xed\xa0\x80"}',
    b'\xef\xbb\xbf{"a": 1}', '{"a": 1}'.encode("utf-16"), '{"a": 1}'.encode("utf-32-le"),
]  # fmt: skip


@pytest.mark.parametrize("text", ACCEPTED)
def test_edge_cases_the_guard_accepts_decode_as_json_loads_decodes_them(text):
    body = text.encode()
    assert same(RequestGuard.parse(body), json.loads(body))


@pytest.mark.parametrize("body", REFUSED)
def test_what_json_loads_reads_beyond_the_standard_is_refused_by_the_guard(body):
    json.loads(body)  # Python's parser takes it...
    with pytest.raises(AdmissionError) as refused:
        RequestGuard.parse(body)  # ...the guard does not: invalid_json, before vLLM
    assert refused.value.outcome is Outcome.REJECTED_INVALID_JSON


FIELDS = {"priority": 2, "cache_salt": "ab\"c\u00e9"}


@pytest.mark.parametrize("text", ['{"model": "m"}', '{}', '{"priority": 7, "model": "m"}', '{"model": "m", "priority": -3} ',
                                  '{"cache_salt": "mine", "model": "m"}'])  # fmt: skip
def test_the_fields_set_on_the_parse_are_what_a_parser_reads_from_the_appended_keys(text):
    parsed = RequestGuard.parse(text.encode())
    parsed.update(FIELDS)
    appended = with_fields(text.encode(), FIELDS)
    assert same(parsed, json.loads(appended)) and same(parsed, RequestGuard.parse(appended))


@pytest.mark.parametrize("body", [b'{"model": "m", "priority": 7}', b'{"a": 1}\n  ', b"{}", b'{ }'])
def test_fields_are_appended_to_the_body_and_override_the_clients(body):
    out = with_fields(body, {"priority": -1, "cache_salt": "s"})
    assert json.loads(out)["priority"] == -1 and json.loads(out)["cache_salt"] == "s"
    assert {k: v for k, v in json.loads(out).items() if k not in ("priority", "cache_salt")} == {
        k: v for k, v in json.loads(body).items() if k != "priority"}
    assert out.startswith(body.rstrip()[:-1].rstrip())  # appended: the body is not re-encoded
    assert with_fields(body, {}) is body
    with pytest.raises(ValueError):
        with_fields(b'[1]', {"priority": 1})


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
        assert loads(bytes(bytearray(body))) is parsed  # equal bytes, another object: handed over
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


def test_one_use_empties_the_handed_parse_for_every_context_holding_it(installed):
    """A task started by the request (vLLM's app, a middleware's child) uses it; the
    request's own context must not hand the same, perhaps mutated, object out again."""
    body, parsed = b'{"model": "m"}', {"model": "m"}
    loads = starlette.requests.json.loads

    async def request_task():
        handoff.hand_over(body, parsed)

        async def vllm_app():
            got = loads(body)
            got["tool_choice"] = "auto"  # vLLM's validators change what they are given
            return got

        assert await asyncio.ensure_future(vllm_app()) is parsed
        return loads(body)

    again = asyncio.run(request_task())
    assert again == {"model": "m"} and again is not parsed


def vllm_app(path: str, seen: dict):
    """vLLM 0.32's own route for ``path`` (its request model, decorators and body
    dependency) on FastAPI; the serving object behind it records the request it is given
    and answers with an empty stream."""
    from fastapi import FastAPI
    from vllm.entrypoints.openai.chat_completion.api_router import router as chat_router
    from vllm.entrypoints.openai.completion.api_router import router as completion_router

    class Serving:
        async def create_chat_completion(self, request, raw_request):
            return await self.create_completion(request, raw_request)

        async def create_completion(self, request, raw_request):
            seen["request"] = request

            async def events():
                yield "data: [DONE]\n\n"

            return events()

    app = FastAPI()
    app.include_router(chat_router if path == "/v1/chat/completions" else completion_router)
    app.state.openai_serving_chat = app.state.openai_serving_completion = Serving()
    return app


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_vllms_routes_behind_the_admission_middleware_take_its_parse(installed, path):
    """The real middleware in front of vLLM's real route: the route gets the body as the
    client sent it, with the class the middleware chose (x-priority: batch overrides the
    body's own priority, -100), and the replayed bytes are never parsed."""
    from tests.unit.admission.test_middleware import Client, build, request

    url = "data:image/png;base64," + "A" * 300_000  # a body of megabytes in production
    if path == "/v1/chat/completions":
        body = {"model": "medgemma-4b-it", "max_tokens": 3, "priority": -100, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}]}  # fmt: skip
    else:
        body = {"model": "medgemma-4b-it", "max_tokens": 3, "priority": -100, "prompt": ["a b", "c"], "stream": True}
    seen: dict = {}

    async def scenario():
        mw, controller, _ = build(vllm_app(path, seen))
        scope, payload = request(body, path=path)
        scope["headers"].append((b"x-priority", b"batch"))
        scope.update(query_string=b"", root_path="", scheme="http", server=("t", 80), client=("t", 1))
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        return client, controller, len(payload) + len(b',"priority":1')

    client, controller, replayed = asyncio.run(scenario())
    assert client.status == 200, client.sent
    got = seen["request"]
    assert got.priority == 1 and got.max_tokens == 3  # batch, as the middleware decided
    if path == "/v1/chat/completions":
        assert got.messages[0]["content"][0]["image_url"]["url"] == url
    else:
        assert got.prompt == ["a b", "c"]
    assert replayed not in installed  # FastAPI never parsed the replayed body's bytes
    assert controller.running_count == 0
