"""Usage records through the real admission middleware (a fake vLLM app): one record per
request, whatever its end, with the right fields and no content."""

import asyncio
import base64
import io
import json
from pathlib import Path

import jsonschema
from PIL import Image

from serving.admission.keys import hash_key
from serving.admission.outcomes import Outcome
from serving.usage.recorder import UsageRecorder
from tests.unit.admission.test_middleware import CHAT, KEY, Client, ErrorApp, FakeEngineApp, build, request

SCHEMA = json.loads((Path(__file__).parents[3] / "serving/usage/usage-record.schema.json").read_text())
CANARY = "canary-patient-zebra-4471"


class CaptureLog:
    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(json.loads(json.dumps(record)))


def build_recorded(app, **kwargs):
    mw, controller, ledger = build(app, **kwargs)
    log = CaptureLog()
    mw.usage = UsageRecorder(controller.metrics, log, served_models=frozenset({"medgemma-4b-it"}),
                             account_metrics_max=10, replica="test:1")  # fmt: skip
    return mw, controller, log


def valid(record):
    record = {**record, "time": "2026-12-05T00:00:00.000Z"}  # the writer formats the time
    jsonschema.Draft202012Validator(SCHEMA).validate(record)
    return True


async def run(mw, body=CHAT, key=KEY, path="/v1/chat/completions", disconnect=False):
    scope, payload = request(body, key=key, path=path)
    client = Client(payload)
    if disconnect:
        client.disconnect()
    await mw(scope, client.receive, client.send)
    return client


def test_a_completed_stream_has_one_record_with_account_key_units_and_latencies():
    async def scenario():
        mw, _, log = build_recorded(FakeEngineApp())
        await run(mw, {**CHAT, "stream": True, "messages": [{"role": "user", "content": CANARY}]})
        [record] = log.records
        assert valid(record)
        assert record["outcome"] == "completed" and record["status"] == 200 and record["error_code"] is None
        assert (record["account"], record["plan"], record["key_id"]) == ("acme", "two", hash_key(KEY)[:12])
        assert record["priority"] == "interactive" and record["model"] == "medgemma-4b-it" and record["stream"]
        assert record["units"] == 1 and record["unit_seconds"] >= 0 and record["client_left"] is False
        assert 0 <= record["queue_wait_s"] <= record["ttft_s"] <= record["e2e_s"]
        assert CANARY not in json.dumps(record) and KEY not in json.dumps(record)
        assert hash_key(KEY) not in json.dumps(record)  # the key id only, never the full digest
    asyncio.run(scenario())


def test_unit_seconds_are_units_times_admission_to_release():
    async def scenario():
        app = FakeEngineApp(chunks=2)
        mw, controller, log = build_recorded(app)
        app.gate.clear()
        task = asyncio.ensure_future(run(mw, {**CHAT, "n": 2}))
        await asyncio.sleep(0.2)
        [held] = list(controller._running)
        app.gate.set()
        await task
        [record] = log.records
        assert record["units"] == 2
        assert record["unit_seconds"] == 2 * (held.released_at - held.admitted_at)
        assert record["unit_seconds"] >= 2 * 0.2
    asyncio.run(scenario())


def test_refusals_before_and_after_authentication_each_have_one_record():
    async def scenario():
        mw, _, log = build_recorded(FakeEngineApp())
        await run(mw, key="mgk_wrong")
        await run(mw, path="/v1/" + CANARY)
        await run(mw, {**CHAT, "max_tokens": 5000})
        await run(mw, {**CHAT, "model": CANARY})  # served: the fake app does not check names
        assert [r["outcome"] for r in log.records] == [
            "rejected_invalid_api_key", "rejected_not_found", "rejected_context_length", "completed"]
        bad_key, not_found, too_long, other_model = log.records
        assert (bad_key["status"], bad_key["error_code"], bad_key["account"], bad_key["key_id"]) == (
            401, "invalid_api_key", None, None)
        assert not_found["status"] == 404 and not_found["endpoint"] == "other"  # never the client's path
        assert too_long["status"] == 400 and too_long["error_code"] == "context_length_exceeded"
        assert too_long["account"] == "acme" and too_long["priority"] == "interactive" and too_long["units"] == 0
        assert other_model["model"] == "other"  # a client's free text never lands in a record
        assert all(valid(r) and CANARY not in json.dumps(r) for r in log.records)
    asyncio.run(scenario())


def test_over_budget_is_a_429_record_and_the_held_streams_complete():
    async def scenario():
        app = FakeEngineApp(chunks=2)
        mw, _, log = build_recorded(app)
        app.gate.clear()
        held = [asyncio.ensure_future(run(mw)) for _ in range(2)]
        await asyncio.sleep(0.05)
        await run(mw)
        app.gate.set()
        await asyncio.gather(*held)
        outcomes = [r["outcome"] for r in log.records]
        assert outcomes == ["rejected_concurrency_limit", "completed", "completed"]
        assert log.records[0]["status"] == 429 and log.records[0]["error_code"] == "concurrency_limit_exceeded"
    asyncio.run(scenario())


def test_a_client_that_left_mid_stream_is_recorded_as_such():
    async def scenario():
        async def disconnecting_app(scope, receive, send):
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await receive()  # the disconnect

        mw, _, log = build_recorded(FakeEngineApp())
        mw.app = disconnecting_app
        await run(mw, disconnect=True)
        [record] = log.records
        assert record["outcome"] == "evicted_client_gone" and record["client_left"] is True
        assert record["status"] == 200 and record["ttft_s"] is None and valid(record)
    asyncio.run(scenario())


def test_a_drained_request_and_an_engine_error_carry_their_codes():
    async def scenario():
        started = asyncio.Event()

        async def slow_app(scope, receive, send):
            await receive()
            started.set()
            await asyncio.sleep(60)

        mw, controller, log = build_recorded(slow_app)
        task = asyncio.ensure_future(run(mw))
        await started.wait()
        await controller.end_running(Outcome.EVICTED_DRAINED, "The server shut down; retry it.")
        await task
        mw.app = ErrorApp()
        await run(mw)
        drained, engine_error = log.records
        assert (drained["outcome"], drained["status"], drained["error_code"]) == ("evicted_drained", 503, "draining")
        assert drained["units"] == 1 and drained["client_left"] is False
        assert (engine_error["outcome"], engine_error["status"], engine_error["error_code"]) == (
            "completed", 400, "invalid_request")
        assert engine_error["ttft_s"] is None  # client-seen TTFT is for 2xx responses only
    asyncio.run(scenario())


def test_images_and_their_pixels_are_counted_not_kept():
    def png(width, height):
        out = io.BytesIO()
        Image.new("RGB", (width, height)).save(out, format="PNG")
        return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()

    async def scenario():
        mw, _, log = build_recorded(FakeEngineApp())
        content = [{"type": "text", "text": CANARY}, {"type": "image_url", "image_url": {"url": png(30, 20)}},
                   {"type": "image_url", "image_url": {"url": png(8, 8)}}]  # fmt: skip
        await run(mw, {**CHAT, "messages": [{"role": "user", "content": content}]})
        [record] = log.records
        assert (record["images"], record["image_pixels"]) == (2, 30 * 20 + 8 * 8)
        assert "base64" not in json.dumps(record) and CANARY not in json.dumps(record)
    asyncio.run(scenario())


def test_a_full_disk_never_fails_a_request():
    from serving.usage.writer import UsageLog

    async def scenario():
        mw, controller, _ = build_recorded(FakeEngineApp())
        log = UsageLog("/dev/full", controller.metrics)  # every write fails with ENOSPC
        mw.usage.log = log
        client = await run(mw)
        log.close()
        assert client.status == 200 and client.sent[-1]["more_body"] is False
        dropped = controller.metrics.registry.get_sample_value("medgemma_usage_records_dropped_total",
                                                               {"reason": "write_error"})  # fmt: skip
        assert dropped == 1
    asyncio.run(scenario())


def test_per_account_labels_are_capped_and_refused_keys_count_as_none():
    from serving.admission.keys import KeyStore

    second = "mgk_second"

    async def scenario():
        mw, controller, _ = build_recorded(FakeEngineApp())
        controller.keys = KeyStore.from_dict({
            "plans": {"two": {"concurrency": 2}}, "accounts": {"acme": {"plan": "two"}, "beta": {"plan": "two"}},
            "keys": [{"sha256": hash_key(KEY), "account": "acme"}, {"sha256": hash_key(second), "account": "beta"}],
        })  # fmt: skip
        mw.usage = UsageRecorder(controller.metrics, CaptureLog(), account_metrics_max=1)
        await run(mw)
        await run(mw, key=second)
        await run(mw, key="mgk_wrong")
        value = controller.metrics.registry.get_sample_value
        requests = "medgemma_account_requests_total"
        assert value(requests, {"account": "acme", "outcome": "completed"}) == 1  # the first account seen
        assert value(requests, {"account": "other", "outcome": "completed"}) == 1  # beyond the cap
        assert value(requests, {"account": "beta", "outcome": "completed"}) is None
        assert value(requests, {"account": "none", "outcome": "rejected_invalid_api_key"}) == 1
        assert value("medgemma_account_inflight_units", {"account": "acme"}) == 0
        assert value("medgemma_account_unit_seconds_total", {"account": "other"}) > 0
    asyncio.run(scenario())
