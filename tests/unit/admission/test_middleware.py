"""The ASGI middleware over a fake inner app (the engine is faked; everything else is real)."""

import asyncio
import json
import time

import pytest
from prometheus_client import CollectorRegistry

from serving.admission import handoff
from serving.admission.cache_scope import account_salt
from serving.admission.clock import FakeClock
from serving.admission.controller import AdmissionController
from serving.admission.keys import KeyStore, hash_key
from serving.admission.ledger import InProcessLedger
from serving.admission.estimate import PromptEstimator
from serving.admission.middleware import AdmissionMiddleware
from serving.admission.outcomes import Outcome
from serving.admission.queue import Capacity, FairQueue
from serving.metrics import ServingMetrics
from tests.unit.admission.ledgers import units_held

KEY = "mgk_test"
KEYS = {
    "plans": {"two": {"concurrency": 2}},
    "accounts": {"acme": {"plan": "two"}},
    "keys": [{"sha256": hash_key(KEY), "account": "acme"}],
}


class FakeEngineApp:
    """Streams ``chunks`` body parts; ``gate`` lets a test hold the stream open."""

    def __init__(self, chunks=3):
        self.chunks = chunks
        self.gate = asyncio.Event()
        self.gate.set()
        self.bodies = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(self.chunks):
            await self.gate.wait()
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": i < self.chunks - 1})


def build(app, max_requests=8, max_model_len=1000):
    clock = FakeClock()
    ledger = InProcessLedger()
    controller = AdmissionController(
        KeyStore.from_dict(KEYS), ledger, FairQueue(Capacity(max_requests, 10**6), 4, clock),
        ServingMetrics(CollectorRegistry()), max_model_len=max_model_len,
        model_costs={"medgemma-4b-it": 1}, queue_timeout_s=30, clock=clock,
    )  # fmt: skip
    estimator = PromptEstimator(lambda text: len(text.split()), image_tokens=256, max_model_len=max_model_len)
    return AdmissionMiddleware(app, controller, estimator), controller, ledger


def request(body: dict, key: str | None = KEY, path="/v1/chat/completions"):
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    payload = json.dumps(body).encode()
    return scope, payload


class Client:
    def __init__(self, payload: bytes):
        self.sent = []
        self.incoming = asyncio.Queue()
        self.incoming.put_nowait({"type": "http.request", "body": payload[:10], "more_body": True})
        self.incoming.put_nowait({"type": "http.request", "body": payload[10:], "more_body": False})

    async def receive(self):
        return await self.incoming.get()

    async def send(self, message):
        self.sent.append(message)

    def disconnect(self):
        self.incoming.put_nowait({"type": "http.disconnect"})

    @property
    def status(self):
        return self.sent[0]["status"]

    @property
    def headers(self):
        return dict(self.sent[0]["headers"])

    def json(self):
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


CHAT = {"model": "medgemma-4b-it", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 5}


class HandoffReadingApp(FakeEngineApp):
    """Also keeps the parse handed over with each body: what vLLM's route reads instead."""

    def __init__(self):
        super().__init__()
        self.parses = []

    async def __call__(self, scope, receive, send):
        handed = handoff._handed.get()
        self.parses.append(handed[1] if handed else None)
        await super().__call__(scope, receive, send)


def test_vllm_gets_the_accounts_cache_salt_in_place_of_the_clients():
    """Without a salt, or with its own, a request reaches vLLM (its bytes and the parse vLLM
    reads) with a salt of its account; one vLLM would refuse is left for vLLM to refuse."""

    async def salts(asked: list) -> tuple[list, list]:
        app = HandoffReadingApp()
        mw, _, _ = build(app)
        for value in asked:
            body = CHAT if value is None else {**CHAT, "cache_salt": value}
            scope, payload = request(body)
            client = Client(payload)
            await mw(scope, client.receive, client.send)
            assert client.status == 200
        return [json.loads(body)["cache_salt"] for body in app.bodies], [p["cache_salt"] for p in app.parses]

    sent, parsed = asyncio.run(salts([None, "ward-3", account_salt("other"), "", "a/b"]))
    assert sent == parsed == [account_salt("acme"), account_salt("acme", "ward-3"),
                              account_salt("acme", account_salt("other")), "", "a/b"]  # fmt: skip


def test_admitted_stream_gets_headers_body_replayed_and_units_released_at_the_end():
    async def scenario():
        app = FakeEngineApp()
        mw, _, ledger = build(app)
        scope, payload = request(CHAT)
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        # vLLM sees the body as sent, with the request's class as its scheduling priority
        # and its account's prefix-cache salt
        assert len(app.bodies) == 1
        assert json.loads(app.bodies[0]) == {**CHAT, "priority": 0, "cache_salt": account_salt("acme")}
        assert app.bodies[0].startswith(payload[:-1])  # appended, not re-encoded
        assert client.status == 200
        assert client.headers[b"x-ratelimit-limit-concurrency"] == b"2"
        assert client.headers[b"x-ratelimit-remaining-concurrency"] == b"1"
        assert units_held(ledger) == 0
    asyncio.run(scenario())


def test_units_are_released_at_the_last_chunk_not_later():
    async def scenario():
        app = FakeEngineApp(chunks=2)
        mw, _, ledger = build(app)
        scope, payload = request(CHAT)
        client = Client(payload)
        app.gate.clear()
        task = asyncio.ensure_future(mw(scope, client.receive, client.send))
        await asyncio.sleep(0.01)
        assert units_held(ledger) == 1
        app.gate.set()
        await task
        assert units_held(ledger) == 0
    asyncio.run(scenario())


def test_third_concurrent_request_is_429_with_headers():
    async def scenario():
        app = FakeEngineApp()
        app.gate.clear()
        mw, _, ledger = build(app)
        tasks = []
        for _ in range(2):
            scope, payload = request(CHAT)
            tasks.append(asyncio.ensure_future(mw(scope, Client(payload).receive, Client(payload).send)))
        await asyncio.sleep(0.01)
        scope, payload = request(CHAT)
        third = Client(payload)
        await mw(scope, third.receive, third.send)
        assert third.status == 429
        assert third.headers[b"x-ratelimit-remaining-concurrency"] == b"0"
        assert int(third.headers[b"retry-after"]) >= 1
        assert third.json()["error"]["code"] == "concurrency_limit_exceeded"
        app.gate.set()
        await asyncio.gather(*tasks)
        assert units_held(ledger) == 0
    asyncio.run(scenario())


def test_missing_or_wrong_key_is_401_and_never_reaches_the_app():
    async def scenario():
        app = FakeEngineApp()
        mw, _, _ = build(app)
        for key in (None, "mgk_wrong"):
            scope, payload = request(CHAT, key=key)
            client = Client(payload)
            await mw(scope, client.receive, client.send)
            assert client.status == 401 and client.json()["error"]["code"] == "invalid_api_key"
            assert client.headers[b"x-ratelimit-limit-concurrency"] == b"0"
        assert app.bodies == []
    asyncio.run(scenario())


def test_context_too_long_is_400_before_the_engine():
    async def scenario():
        app = FakeEngineApp()
        mw, _, ledger = build(app, max_model_len=300)
        body = dict(CHAT, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,xx"}},
            {"type": "text", "text": "describe"}]}], max_tokens=100)  # fmt: skip
        scope, payload = request(body)
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        assert client.status == 400 and client.json()["error"]["code"] == "context_length_exceeded"
        assert app.bodies == [] and units_held(ledger) == 0
    asyncio.run(scenario())


def test_disconnect_mid_stream_releases_at_once():
    async def scenario():
        app = FakeEngineApp(chunks=3)
        mw, _, ledger = build(app)

        async def disconnecting_app(scope, receive, send):
            await receive()  # the body
            await send({"type": "http.response.start", "status": 200, "headers": []})
            message = await receive()  # what vLLM's disconnect listener sees
            assert message["type"] == "http.disconnect"
            assert units_held(ledger) == 0  # released before the app even reacts
        mw.app = disconnecting_app
        scope, payload = request(CHAT)
        client = Client(payload)
        client.disconnect()
        await mw(scope, client.receive, client.send)
        assert units_held(ledger) == 0
    asyncio.run(scenario())


def test_client_leaving_while_queued_gets_nothing_and_holds_nothing():
    async def scenario():
        app = FakeEngineApp()
        app.gate.clear()
        mw, controller, ledger = build(app, max_requests=1)
        scope, payload = request(CHAT)
        first = asyncio.ensure_future(mw(scope, Client(payload).receive, Client(payload).send))
        await asyncio.sleep(0.01)
        scope, payload = request(CHAT)
        queued = Client(payload)
        task = asyncio.ensure_future(mw(scope, queued.receive, queued.send))
        await asyncio.sleep(0.01)
        assert controller.queue.depth == 1
        queued.disconnect()
        await asyncio.wait_for(task, 1)
        assert queued.sent == [] and controller.queue.depth == 0
        assert units_held(ledger) == 1  # only the first, still streaming
        app.gate.set()
        await first
        assert units_held(ledger) == 0
    asyncio.run(scenario())


def test_public_paths_pass_other_routes_404_and_invalid_json_never_reaches_vllm():
    async def scenario():
        app = FakeEngineApp(chunks=1)
        mw, _, ledger = build(app)
        scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": []}
        client = Client(b"")
        await mw(scope, client.receive, client.send)
        assert client.status == 200 and len(app.bodies) == 1
        for path in ("/v1/responses", "/v1/messages", "/inference/v1/generate", "/tokenize"):
            scope, payload = request(CHAT, path=path)
            client = Client(payload)
            await mw(scope, client.receive, client.send)
            assert client.status == 404 and client.json()["error"]["code"] == "not_found"
        scope, _ = request(CHAT)
        client = Client(b"{not json")
        await mw(scope, client.receive, client.send)
        assert client.status == 400 and client.json()["error"]["code"] == "invalid_json"
        assert len(app.bodies) == 1 and units_held(ledger) == 0
    asyncio.run(scenario())


class ErrorApp:
    """Answers like vLLM does for a bad request: its numeric code, in two body chunks."""

    async def __call__(self, scope, receive, send):
        await receive()
        body = json.dumps({"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}})
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"999")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body[:10].encode(), "more_body": True})
        await send({"type": "http.response.body", "body": body[10:].encode(), "more_body": False})


def test_vllm_error_bodies_get_a_string_code_and_units_are_released():
    async def scenario():
        mw, _, ledger = build(ErrorApp())
        scope, payload = request(CHAT)
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        assert client.status == 400
        error = client.json()["error"]
        assert error == {"message": "bad", "type": "BadRequestError", "param": None, "code": "invalid_request"}
        length = dict(client.sent[0]["headers"])[b"content-length"]
        assert int(length) == len(b"".join(m.get("body", b"") for m in client.sent[1:]))
        assert units_held(ledger) == 0
    asyncio.run(scenario())


def test_request_id_is_honoured_when_sane_and_generated_otherwise():
    async def scenario():
        mw, _, _ = build(FakeEngineApp(chunks=1))
        for given, kept in ((b"abc-123", True), (b"bad id\n", False), (None, False)):
            scope, payload = request(CHAT)
            if given is not None:
                scope["headers"].append((b"x-request-id", given))
            client = Client(payload)
            await mw(scope, client.receive, client.send)
            rid = dict(client.sent[0]["headers"])[b"x-request-id"]
            assert (rid == given) if kept else (len(rid) == 32 and rid != given)
    asyncio.run(scenario())


def test_n_costs_units_per_sequence_and_more_than_the_plan_is_a_400():
    async def scenario():
        app = FakeEngineApp(chunks=1)
        mw, _, ledger = build(app)
        scope, payload = request({**CHAT, "n": 3})  # plan "two"
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        assert client.status == 400 and client.json()["error"]["code"] == "request_exceeds_plan"
        app.gate.clear()
        scope, payload = request({**CHAT, "n": 2})
        client = Client(payload)
        task = asyncio.ensure_future(mw(scope, client.receive, client.send))
        await asyncio.sleep(0.01)
        assert units_held(ledger) == 2
        app.gate.set()
        await task
        assert client.status == 200 and units_held(ledger) == 0
    asyncio.run(scenario())


def test_end_running_ends_a_stream_with_an_error_event_and_releases_its_units():
    async def scenario():
        app = FakeEngineApp(chunks=3)
        mw, controller, ledger = build(app)
        scope, payload = request(CHAT)
        client = Client(payload)
        app.gate.clear()  # the stream sends its headers, then hangs
        task = asyncio.ensure_future(mw(scope, client.receive, client.send))
        await asyncio.sleep(0.01)
        assert controller.running_count == 1 and controller.busy() == 1
        await asyncio.wait_for(controller.end_running(Outcome.EVICTED_DRAINED, "The server shut down; retry it."), 1)
        await task
        assert client.status == 200
        last = client.sent[-1]
        assert last["more_body"] is False
        events = [line[6:] for line in last["body"].decode().split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[0])["error"]["code"] == "draining"
        assert units_held(ledger) == 0 and controller.busy() == 0 and controller.running_count == 0
    asyncio.run(scenario())


def test_end_running_before_the_response_started_is_a_503_draining():
    async def scenario():
        started = asyncio.Event()

        async def slow_app(scope, receive, send):
            await receive()
            started.set()
            await asyncio.sleep(60)

        mw, controller, ledger = build(slow_app)
        scope, payload = request(CHAT)
        client = Client(payload)
        task = asyncio.ensure_future(mw(scope, client.receive, client.send))
        await started.wait()
        await controller.end_running(Outcome.EVICTED_DRAINED, "The server shut down; retry it.")
        await task
        assert client.status == 503 and client.json()["error"]["code"] == "draining"
        assert client.headers[b"retry-after"] == b"5"
        assert units_held(ledger) == 0
    asyncio.run(scenario())


def test_a_client_that_stops_reading_is_ended_and_its_units_released():
    async def scenario():
        app = FakeEngineApp(chunks=50)
        mw, controller, ledger = build(app)
        aborted = []

        async def abort(engine_request_id):
            aborted.append(engine_request_id)

        controller.abort = abort
        scope, payload = request(CHAT)
        scope["headers"].append((b"x-request-id", b"client-7"))
        client = Client(payload)
        blocked = asyncio.Event()

        async def stuck_send(message):  # the transport's buffers are full: send never returns
            client.sent.append(message)
            if message["type"] == "http.response.body":
                blocked.set()
                await asyncio.Event().wait()

        task = asyncio.ensure_future(mw(scope, client.receive, stuck_send))
        await asyncio.wait_for(blocked.wait(), 1)
        assert units_held(ledger) == 1
        assert await controller.end_stalled(stall_timeout_s=30) == 0  # not stalled long enough yet
        assert await controller.end_stalled(stall_timeout_s=30, now=time.monotonic() + 31) == 1
        await asyncio.wait_for(task, 1)
        assert units_held(ledger) == 0 and controller.running_count == 0
        assert len(client.sent) == 2  # nothing more was pushed at the stuck client
        # vLLM got an id of our making (unique even if clients reuse theirs), and that
        # engine request was aborted by it.
        sent_id = dict(scope["headers"])[b"x-request-id"].decode()
        assert sent_id.startswith("client-7.") and aborted == [["chatcmpl-" + sent_id]]
    asyncio.run(scenario())


def test_abort_reaches_every_engine_request_of_a_batched_completion():
    from serving.admission.build import engine_aborter
    from serving.admission.middleware import engine_request_ids

    scope = {"path": "/v1/completions", "headers": []}
    ids = engine_request_ids(scope, b"rid", prompts=3)
    base = ids[0]
    assert ids == [base, f"{base}-0", f"{base}-1", f"{base}-2"] and base.startswith("cmpl-rid.")

    class Engine:
        class output_processor:  # noqa: N801 - vLLM's attribute name
            external_req_ids = {f"{base}-0": [], f"{base}-5": [], f"{base}-x-beam-0": [], "cmpl-other-0": []}

        aborted: list = []

        async def abort(self, request_ids):
            self.aborted.extend(request_ids)

    engine = Engine()
    asyncio.run(engine_aborter(engine)(ids))
    assert set(engine.aborted) == {*ids, f"{base}-5", f"{base}-x-beam-0"}  # never another request's
    assert engine_request_ids({"path": "/v1/chat/completions", "headers": []}, b"r")[0].startswith("chatcmpl-r.")


class CrashingApp:
    """Like vLLM's app when an exception escapes its handlers: Starlette's plain 500, re-raised."""

    def __init__(self, exc):
        self.exc = exc

    async def __call__(self, scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Internal Server Error", "more_body": False})
        raise self.exc


@pytest.mark.parametrize("exc,status,code", [
    (RuntimeError("secret prompt text in a message"), 500, "internal_error"),
    (TimeoutError("secret prompt text in a message"), 504, "upstream_timeout"),  # a remote image fetch
])  # fmt: skip
def test_an_exception_inside_vllm_is_an_openai_error_logged_without_its_message(caplog, exc, status, code):
    async def scenario():
        mw, _, ledger = build(CrashingApp(exc))
        scope, payload = request(CHAT)
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        assert client.status == status and client.json()["error"]["code"] == code
        assert dict(client.sent[0]["headers"])[b"content-type"] == b"application/json"
        assert len(client.sent) == 2 and units_held(ledger) == 0
    with caplog.at_level("DEBUG", logger="serving"):
        asyncio.run(scenario())
    assert type(exc).__name__ in caplog.text and "secret prompt" not in caplog.text


def test_in_stream_error_events_get_a_string_code():
    from serving.admission.engine_errors import normalised_sse_error

    dead = b'data: {"error": {"message": "EngineCore encountered an issue.", "type": "EngineDeadError", "param": null, "code": 500}}\n\ndata: [DONE]\n\n'
    out = normalised_sse_error(dead)
    assert out.endswith(b"\n\ndata: [DONE]\n\n")
    assert json.loads(out.split(b"\n\n")[0][6:])["error"]["code"] == "engine_unavailable"
    bad = b'data: {"error": {"message": "x", "type": "BadRequestError", "param": null, "code": 400}}\n\n'
    assert json.loads(normalised_sse_error(bad)[6:])["error"]["code"] == "invalid_request"
    assert normalised_sse_error(b'data: {"error": not json') == b'data: {"error": not json'


def test_an_engine_death_has_one_code_in_a_stream_and_in_a_plain_error():
    from serving.admission.engine_errors import normalised_error

    body = b'{"error": {"message": "EngineCore encountered an issue.", "type": "EngineDeadError", "param": null, "code": 500}}'
    start, out = normalised_error({"type": "http.response.start", "status": 500, "headers": []}, body)
    assert json.loads(out)["error"]["code"] == "engine_unavailable"
    # the same status and Retry-After as admission's own 503 engine_unavailable
    assert start["status"] == 503 and dict(start["headers"])[b"retry-after"] == b"10"


def test_client_seen_latency_is_recorded_for_completed_requests_only():
    from prometheus_client import generate_latest

    class SlowStream(FakeEngineApp):
        async def __call__(self, scope, receive, send):
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            await asyncio.sleep(0.05)  # "prefill"
            for i in range(5):  # 5 content events (4 gaps, 30 ms in all), then [DONE]
                await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
                await asyncio.sleep(0.01 if i < 3 else 0)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def scenario():
        mw, controller, _ = build(SlowStream())
        scope, payload = request(CHAT)
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        scope, payload = request(CHAT, key="wrong")  # a 401 is not a latency sample
        await mw(scope, Client(payload).receive, Client(payload).send)
        return controller.metrics

    metrics = asyncio.run(scenario())
    registry = metrics.registry
    assert registry.get_sample_value("medgemma_request_ttft_seconds_count", {"stream": "true", "priority": "interactive"}) == 1
    ttft = registry.get_sample_value("medgemma_request_ttft_seconds_sum", {"stream": "true", "priority": "interactive"})
    e2e = registry.get_sample_value("medgemma_request_e2e_seconds_sum", {"stream": "true", "priority": "interactive"})
    tpot = registry.get_sample_value("medgemma_request_time_per_output_token_seconds_sum")
    assert 0.05 <= ttft < e2e
    assert 0.007 <= tpot < 0.05  # ~30 ms / 4 gaps
    assert b'medgemma_request_e2e_seconds_bucket{le="0.1",priority="interactive",stream="true"}' in generate_latest(registry)


def test_a_class_reaches_vllm_as_its_priority_orders_preprocessing_and_is_named_in_the_reply():
    from serving.admission.preprocess import preprocess_rank

    class RecordingApp(FakeEngineApp):
        async def __call__(self, scope, receive, send):
            self.rank = preprocess_rank.get()  # what vLLM's preprocessing would be ordered by
            await super().__call__(scope, receive, send)

    async def scenario():
        app = RecordingApp()
        mw, _, _ = build(app)
        scope, payload = request(CHAT)
        scope["headers"].append((b"x-priority", b"batch"))  # below the plan's interactive: allowed
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        assert client.status == 200 and client.headers[b"x-priority"] == b"batch"
        assert json.loads(app.bodies[0])["priority"] == 1  # vLLM schedules (and preempts) it as batch
        assert app.rank == 2
    asyncio.run(scenario())
