"""Mixed traffic in one run: streams with their own key, class and shape; priority classes on
the wire; figures per class, account and stream."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from loadtests import cli
from loadtests.client import RequestRecord, classify
from loadtests.config import load_settings
from loadtests.profiles import Stage, Stream
from loadtests.report import terminal_table
from loadtests.runner import Runner, StageResult
from loadtests.summary import summarize_stage
from loadtests.workload import Workload, WorkloadSpec, parse_key
from serving.config import SettingsError

SCENARIO = """
duration: 20
warmup: 2
images: 0
streams:
  - name: backlog
    key: "backlog=$TEST_BATCH_KEY"
    priority: batch
    concurrency: 12
    output_tokens: 128
  - name: stat
    key: "clinic=$TEST_STAT_KEY"
    priority: stat
    rate: 0.5
    arrival: gamma
    burstiness: 4
"""


@pytest.fixture
def scenario(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_BATCH_KEY", "mgk_batch_secret")
    monkeypatch.setenv("TEST_STAT_KEY", "mgk_stat_secret")
    path = tmp_path / "mixed.yaml"
    path.write_text(SCENARIO)
    return path


def test_a_streams_scenario_becomes_one_stage_of_concurrent_shapes(scenario):
    settings = load_settings({}, scenario)
    (stage,) = settings.stages()
    assert stage.kind == "streams" and [s.name for s in stage.streams] == ["backlog", "stat"]
    backlog, stat = (s.shape for s in stage.streams)
    assert (backlog.kind, backlog.concurrency, backlog.duration_s) == ("concurrency", 12, 20)
    assert (stat.kind, stat.rate, stat.arrival, stat.burstiness, stat.warmup_s) == ("rate", 0.5, "gamma", 4, 2)
    batch_spec, stat_spec = settings.stream_specs()
    assert [(k.label, k.key) for k in batch_spec.keys] == [("backlog", "mgk_batch_secret")]
    assert batch_spec.priority == "batch" and batch_spec.output_tokens.sample(None) == 128
    assert stat_spec.priority == "stat" and stat_spec.output_tokens.sample(None) == 64  # the run's default
    config = json.dumps(settings.public_config())
    assert "secret" not in config and '"key": "clinic"' in config


@pytest.mark.parametrize("yaml_text, message", [
    ("streams: [{name: a}]", "exactly one of concurrency, rate"),
    ("streams: [{name: a, concurrency: 2, rate: 1}]", "exactly one of concurrency, rate"),
    ("concurrency: 2\nstreams: [{name: a, concurrency: 2}]", "their own load shapes"),
    ("streams: [{name: a, concurrency: 2}, {name: a, rate: 1}]", "names must differ"),
    ("streams: [{name: a, concurrency: 2, priority: urgent}]", "priority must be one of"),
    ("streams: [{name: a, concurrency: 2, output_tokens: 'poisson:3'}]", "cannot parse|expected"),
    ("streams: [{name: a, concurrency: 2, key: 'x=$UNSET_LOADTEST_KEY'}]", "UNSET_LOADTEST_KEY is not set"),
    ("concurrency: 2\npriority: urgent", "priority must be one of"),
    ("concurrency: 2\npriority_field: query", "priority_field must be one of"),
])  # fmt: skip
def test_bad_streams_are_refused_before_any_request(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(SettingsError, match=message):
        load_settings({}, path)


def test_ab_refuses_a_streams_scenario(scenario, capsys):
    assert cli.main(["ab", "--scenario", str(scenario), "--url-b", "http://127.0.0.1:1"]) == 2
    assert "streams" in capsys.readouterr().err


@pytest.mark.parametrize("field, header, body", [("header", "batch", None), ("body", None, 1)])
def test_a_class_goes_out_as_our_header_or_as_vllms_body_field(field, header, body):
    request = Workload(WorkloadSpec(priority="batch", priority_field=field)).next()
    assert request.headers.get("x-priority") == header
    assert json.loads(request.body).get("priority") == body
    assert request.priority == "batch"
    plain = Workload(WorkloadSpec()).next()
    assert "x-priority" not in plain.headers and "priority" not in json.loads(plain.body)
    assert plain.priority is None


def test_a_key_written_as_an_environment_variable_is_read_from_it(monkeypatch):
    monkeypatch.setenv("CLINIC_KEY", "mgk_from_env")
    assert parse_key("clinic=$CLINIC_KEY@2") == parse_key("clinic=mgk_from_env@2")


def record(i, key, priority, stream, ttft, status=200):
    r = RequestRecord(i, 0, key, 0, 0, 100, 8, None, start_s=1.0 + i * 0.1, ttft_s=ttft, e2e_s=ttft + 0.5,
                      status=status, output_tokens=8 if status == 200 else None, content_chunks=8,
                      priority=priority, stream=stream)  # fmt: skip
    r.outcome = classify(status, None)
    return r


def test_figures_per_class_account_and_stream_partition_the_stage():
    shape = Stage("concurrency", concurrency=2, duration_s=10)
    stage = Stage("streams", duration_s=10, streams=(Stream("backlog", shape), Stream("stat", shape, 1)))
    records = [record(i, "backlog", "batch", "backlog", 0.4) for i in range(6)]
    records += [record(6 + i, "clinic", "stat", "stat", 0.05) for i in range(3)]
    records.append(record(9, "clinic", "stat", "stat", 0.0, status=429))
    s = summarize_stage(StageResult(0, stage, 0.0, 10.0, 9.0, records), {"ttft": 0.2})
    assert set(s["by_priority"]) == {"batch", "stat"} and set(s["by_key"]) == {"backlog", "clinic"}
    assert set(s["by_stream"]) == {"backlog", "stat"}
    stat = s["by_priority"]["stat"]
    assert stat["outcomes"] == {"ok": 3, "rate_limited": 1} and stat["latency_s"]["ttft"]["p95"] == pytest.approx(0.05)
    assert stat["goodput"]["met"] == 3 and s["by_priority"]["batch"]["goodput"]["met"] == 0  # TTFT 0.4 > 0.2
    for field in ("by_priority", "by_key", "by_stream"):  # each a partition of the stage's requests
        assert sum(g["requests"]["in_window"] for g in s[field].values()) == s["requests"]["in_window"] == 10
        assert sum(g["throughput"]["requests_per_s"] for g in s[field].values()) == pytest.approx(
            s["throughput"]["requests_per_s"])
    table = terminal_table({"stages": [s], "warnings": []})
    assert "  class stat" in table and "  key backlog" in table and "  stream stat" in table


def test_the_runner_drives_every_stream_at_once_with_its_own_key_and_class(monkeypatch):
    """Against an in-process ASGI app: each stream's requests carry its key and class, the
    server's x-priority reply is what the record keeps, and the streams overlap in time."""
    seen: list[tuple[str, str | None, float]] = []

    async def app(scope, receive, send):
        headers = dict(scope["headers"])
        while (await receive()).get("more_body"):
            pass
        seen.append((headers[b"authorization"].decode(), headers.get(b"x-priority", b"").decode() or None,
                     asyncio.get_running_loop().time()))  # fmt: skip
        await asyncio.sleep(0.05)
        granted = b"interactive" if headers.get(b"x-priority") == b"stat" else headers.get(b"x-priority", b"")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"x-priority", granted)]})  # fmt: skip
        chunk = {"choices": [{"delta": {"content": "x"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()})

    shape_a = Stage("concurrency", concurrency=3, duration_s=1.0)
    shape_b = Stage("rate", rate=10, duration_s=1.0)
    stage = Stage("streams", duration_s=1.0, streams=(Stream("backlog", shape_a, 0), Stream("stat", shape_b, 1)))
    workloads = [Workload(WorkloadSpec(images=_const(0), keys=[parse_key("backlog=kb")], priority="batch")),
                 Workload(WorkloadSpec(images=_const(0), keys=[parse_key("clinic=ks")], priority="stat"), seed=1)]  # fmt: skip
    runner = Runner("http://test", Workload(WorkloadSpec(images=_const(0))), stream_workloads=workloads)
    original = httpx.AsyncClient
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: original(transport=httpx.ASGITransport(app=app), **kw))
    (result,) = asyncio.run(runner.run([stage]))
    by_stream = {name: [r for r in result.records if r.stream == name] for name in ("backlog", "stat")}
    assert len(by_stream["backlog"]) >= 10 and len(by_stream["stat"]) >= 3
    assert {(r.key, r.priority) for r in by_stream["backlog"]} == {("backlog", "batch")}
    assert {(r.key, r.priority) for r in by_stream["stat"]} == {("clinic", "interactive")}  # what the server said
    assert {(auth, cls) for auth, cls, _ in seen} == {("Bearer kb", "batch"), ("Bearer ks", "stat")}
    backlog_times = [t for auth, _, t in seen if auth == "Bearer kb"]
    stat_times = [t for auth, _, t in seen if auth == "Bearer ks"]
    # they ran at the same time: STAT requests arrived between the backlog's first and last
    assert sum(min(backlog_times) < t < max(backlog_times) for t in stat_times) >= 2
    assert all(r.outcome == "ok" for r in result.records)


def _const(n):
    from loadtests.distributions import parse

    return parse(f"const:{n}")
