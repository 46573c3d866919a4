"""Admission's spans through the real middleware (fake vLLM app), on the OpenTelemetry SDK's
in-memory exporter: one trace per request, the engine slot's context handed to vLLM."""

import asyncio

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serving.usage.recorder import UsageRecorder
from serving.usage.tracing import RequestTracer
from tests.unit.admission.test_middleware import CHAT, KEY, Client, FakeEngineApp, build, request


def traced(app):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mw, controller, _ = build(app)
    mw.usage = UsageRecorder(controller.metrics, tracer=RequestTracer(provider.get_tracer("test")))
    return mw, exporter


def test_a_request_is_one_trace_and_vllm_gets_the_engine_slots_context():
    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]))
        await FakeEngineApp()(scope, receive, send)

    async def scenario():
        mw, exporter = traced(app)
        scope, payload = request({**CHAT, "messages": [{"role": "user", "content": "secret words"}]})
        scope["headers"].append((b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        spans = {span.name: span for span in exporter.get_finished_spans()}
        assert set(spans) == {"medgemma.request", "admission.authenticate", "admission.budget",
                              "admission.queue", "admission.engine", "admission.release"}  # fmt: skip
        root, engine = spans["medgemma.request"], spans["admission.engine"]
        assert {span.context.trace_id for span in spans.values()} == {0x4BF92F3577B34DA6A3CE929D0E0E4736}
        assert root.parent.span_id == 0x00F067AA0BA902B7
        assert all(span.parent.span_id == root.context.span_id for name, span in spans.items() if name != "medgemma.request")
        # vLLM's handler reads this traceparent: its span becomes the engine slot's child
        traceparent = seen[0][b"traceparent"].decode()
        assert traceparent == f"00-{engine.context.trace_id:032x}-{engine.context.span_id:016x}-01"
        attributes = dict(root.attributes)
        assert attributes["medgemma.account"] == "acme" and attributes["medgemma.outcome"] == "completed"
        assert attributes["medgemma.key_id"] and "secret words" not in repr(attributes)
        assert root.start_time <= spans["admission.queue"].start_time <= engine.start_time
        assert engine.end_time <= spans["admission.release"].end_time <= root.end_time
    asyncio.run(scenario())


def test_a_refused_request_is_a_trace_too_and_without_a_tracer_nothing_is_added():
    async def scenario():
        mw, exporter = traced(FakeEngineApp())
        scope, payload = request(CHAT, key="mgk_wrong")
        client = Client(payload)
        await mw(scope, client.receive, client.send)
        spans = {span.name: span for span in exporter.get_finished_spans()}
        assert set(spans) == {"medgemma.request", "admission.authenticate"}  # refused at its key
        root = spans["medgemma.request"]
        assert root.attributes["medgemma.status"] == 401 and "medgemma.account" not in root.attributes
        assert root.attributes["medgemma.outcome"] == "rejected_invalid_api_key"

        seen = []

        async def app(scope, receive, send):
            seen.append(dict(scope["headers"]))
            await FakeEngineApp()(scope, receive, send)

        plain, _, _ = build(app)
        scope, payload = request(CHAT, key=KEY)
        client = Client(payload)
        await plain(scope, client.receive, client.send)
        assert b"traceparent" not in seen[0]
    asyncio.run(scenario())
