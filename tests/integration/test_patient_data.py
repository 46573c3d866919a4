"""No patient data in logs, at any level: a canary prompt, an image and the generated text
never appear in the server's output, even with --log-level debug; request ids do."""

from __future__ import annotations

import base64
import io
import json
import signal

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.live_server import launch, stop, wait_ready, write_keys
from tests.otlp_receiver import OtlpReceiver

CANARY = "CANARY-7f3e9b21 patient Jane Roe MRN 00482913 chest pain since Tuesday"


@pytest.fixture(scope="module")
def receiver():
    """An OTLP collector the debug server exports its traces to."""
    collector = OtlpReceiver().start()
    yield collector
    collector.stop()


@pytest.fixture(scope="module")
def debug_server(tmp_path_factory, server, receiver):
    root = tmp_path_factory.mktemp("patient-data")
    keys_file = root / "keys.yaml"
    keys = write_keys(keys_file, {"main": "big"})
    srv = launch(root, keys_file, keys, "--log-level", "debug", "--otlp-traces-endpoint", receiver.endpoint,
                 dev_model_dir=server.dev_model_dir,
                 env_extra={"OTEL_BSP_SCHEDULE_DELAY": "200"})  # fmt: skip
    try:
        wait_ready(srv)
        yield srv
    finally:
        stop(srv, signal.SIGKILL)


def canary_image() -> bytes:
    picture = Image.new("RGB", (128, 128), (20, 20, 20))
    ImageDraw.Draw(picture).ellipse((30, 30, 98, 98), fill=(200, 180, 160))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def test_a_request_is_one_trace_of_admission_spans_with_vllms_span_under_the_engine_slot(debug_server, receiver):
    srv = debug_server
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"Authorization": f"Bearer {srv.keys['main']}", "x-request-id": "rid-trace-0001",
               "traceparent": f"00-{parent_trace}-{parent_span}-01"}  # the client's own trace
    body = {"model": "medgemma-4b-it", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
            "min_tokens": 6}  # fmt: skip
    assert httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers, timeout=120).status_code == 200
    wanted = {"medgemma.request", "admission.authenticate", "admission.budget", "admission.queue",
              "admission.engine", "admission.release", "llm_request"}  # fmt: skip
    spans = receiver.wait_for(lambda got: wanted <= {s["name"] for s in got if s["trace_id"] == parent_trace})
    trace = {s["name"]: s for s in spans if s["trace_id"] == parent_trace}
    assert wanted <= set(trace), sorted(trace)
    root, engine, vllm = trace["medgemma.request"], trace["admission.engine"], trace["llm_request"]
    assert root["parent_span_id"] == parent_span  # under the client's trace
    for name in wanted - {"medgemma.request", "llm_request"}:
        assert trace[name]["parent_span_id"] == root["span_id"], name
    assert vllm["parent_span_id"] == engine["span_id"]  # vLLM's own span, under the engine slot
    assert vllm["resource"]["vllm.instrumenting_module_name"] == "vllm.llm_engine" and vllm["attributes"]["gen_ai.usage.completion_tokens"] == 6
    attributes = root["attributes"]
    assert attributes["medgemma.request_id"] == "rid-trace-0001" and attributes["medgemma.account"] == "main"
    assert attributes["medgemma.outcome"] == "completed" and attributes["medgemma.completion_tokens"] == 6
    assert root["start_ns"] <= trace["admission.queue"]["start_ns"] <= engine["start_ns"] <= vllm["start_ns"]
    assert vllm["end_ns"] <= engine["end_ns"] <= trace["admission.release"]["end_ns"] <= root["end_ns"]


def test_canary_text_image_and_outputs_never_reach_the_logs(debug_server, receiver):
    srv = debug_server
    headers = {"Authorization": f"Bearer {srv.keys['main']}", "x-request-id": "rid-canary-0001"}
    encoded = base64.b64encode(canary_image()).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": CANARY},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encoded}},
    ]}]  # fmt: skip
    outputs = []
    body = {"model": "medgemma-4b-it", "messages": messages, "max_tokens": 24, "min_tokens": 24}
    reply = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "rid-canary-0001"
    outputs.append(reply.json()["choices"][0]["message"]["content"])
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        r.read()
    completion = httpx.post(
        srv.url + "/v1/completions", headers=headers, timeout=120,
        json={"model": "medgemma-4b-it", "prompt": CANARY, "max_tokens": 24, "min_tokens": 24},
    )  # fmt: skip
    outputs.append(completion.json()["choices"][0]["text"])
    # Refused and invalid requests carrying the canary: their error paths log nothing of it.
    for bad in (
        {"model": "medgemma-4b-it", "messages": [{"role": "user", "content": [{"type": "text", "text": CANARY}, {"type": "bogus"}]}]},
        {"model": "medgemma-4b-it", "messages": [{"role": "user", "content": CANARY}], "temperature": -1},
        {"model": "no-such-model", "messages": [{"role": "user", "content": CANARY}]},
        {"model": "medgemma-4b-it", "messages": [{"role": "user", "content": CANARY * 4000}]},
    ):  # fmt: skip
        assert httpx.post(srv.url + "/v1/chat/completions", json=bad, headers=headers, timeout=60).status_code >= 400
    httpx.post(srv.url + "/v1/chat/completions", content=CANARY.encode(), headers=headers, timeout=60)

    stop(srv)  # flush everything the processes would write
    log = srv.log()
    assert "DEBUG" in log  # the server really logged at debug level
    assert "rid=rid-canary-0001" in log  # our lines carry the client's request id
    for secret in ("CANARY-7f3e9b21", "Jane Roe", "00482913", encoded[100:160], srv.keys["main"]):
        assert secret not in log, f"{secret[:20]!r} leaked into the log"
    for text in outputs:
        assert len(text) > 20 and text not in log
    # The usage records of these requests (one each, written at shutdown at the latest) hold
    # none of it either.
    usage = srv.usage_log.read_text()
    records = [json.loads(line) for line in usage.splitlines()]
    assert [r["request_id"] for r in records].count("rid-canary-0001") == 8
    for secret in ("CANARY-7f3e9b21", "Jane Roe", "00482913", encoded[100:160], srv.keys["main"], "no-such-model"):
        assert secret not in usage, f"{secret[:20]!r} leaked into a usage record"
    for text in outputs:
        assert text not in usage
    # Nor do the traces of these requests (ids, names, counts and timings only).
    def roots(got):
        return [s for s in got if s["name"] == "medgemma.request"
                and s["attributes"].get("medgemma.request_id") == "rid-canary-0001"]  # fmt: skip

    spans = receiver.wait_for(lambda got: len(roots(got)) >= 8, 15)
    assert len(roots(spans)) == 8  # one trace per request, every one exported
    canary_traces = {s["trace_id"] for s in roots(spans)}
    assert sum(s["name"] == "llm_request" and s["trace_id"] in canary_traces for s in spans) >= 3  # the 3 served
    traced = json.dumps(spans)
    for secret in ("CANARY-7f3e9b21", "Jane Roe", "00482913", encoded[100:160], srv.keys["main"]):
        assert secret not in traced, f"{secret[:20]!r} leaked into a trace"
    for text in outputs:
        assert text not in traced
