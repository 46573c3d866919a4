"""Usage records and per-account metrics on the real server: one record per request whatever
its end, the engine's own token counts, unit-seconds that match the time held."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import jsonschema
import pytest

from serving.admission.keys import hash_key
from tests.live_server import wait_for
from tests.metrics_text import metric

SCHEMA = json.loads((Path(__file__).parents[2] / "serving/usage/usage-record.schema.json").read_text())
MODEL = "medgemma-4b-it"


def records_of(server, *request_ids: str, timeout_s: float = 15.0) -> dict[str, list[dict]]:
    """The records of these request ids, once each has at least one (the writer is async)."""
    found: dict[str, list[dict]] = {}

    def read() -> bool:
        found.clear()
        for record in written(server):
            if record.get("request_id") in request_ids:
                found.setdefault(record["request_id"], []).append(record)
        return all(rid in found for rid in request_ids)

    assert wait_for(read, timeout_s), f"no usage record for {set(request_ids) - set(found)}"
    time.sleep(0.3)  # a second record of the same request would be written by now
    read()
    return found


def written(server) -> list[dict]:
    """The records written so far (a last line still being written is left for later)."""
    lines = server.usage_log.read_text().split("\n")
    return [json.loads(line) for line in lines[:-1] if line]


def rid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def post(server, account: str, body: dict, request_id: str, path="/v1/chat/completions", key=None):
    headers = {"Authorization": f"Bearer {key or server.keys[account]}", "x-request-id": request_id}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def chat(content="Describe the image findings.", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def leave_mid_stream(server, account: str, request_id: str) -> None:
    """A streaming client that reads its first event, then disconnects."""
    import socket

    body = json.dumps(chat(max_tokens=2000, stream=True, ignore_eos=True)).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Authorization: Bearer {server.keys[account]}\r\nx-request-id: {request_id}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        received = b""
        while b"data: {" not in received:
            chunk = sock.recv(4096)
            assert chunk, "the server closed the stream before its first event"
            received += chunk
    # closed: the client left after its first event


def test_every_outcome_has_exactly_one_valid_record(server):
    names = ("ok", "stream", "badkey", "notfound", "badjson", "vllm404", "toolong", "completion", "imageurl",
             "overbudget", "gone")  # fmt: skip
    ids = {name: rid(name) for name in names}
    assert post(server, "usage-a", chat(max_tokens=4), ids["ok"]).status_code == 200
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(max_tokens=4, stream=True),
                      headers={"Authorization": f"Bearer {server.keys['usage-a']}", "x-request-id": ids["stream"]},
                      timeout=120) as reply:  # fmt: skip
        assert reply.status_code == 200
        reply.read()
    assert post(server, "usage-a", chat(), ids["badkey"], key="mgk_not-a-key").status_code == 401
    assert post(server, "usage-a", chat(), ids["notfound"], path="/v1/embeddings").status_code == 404
    bad = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=60,
                     headers={"Authorization": f"Bearer {server.keys['usage-a']}", "x-request-id": ids["badjson"]})
    assert bad.status_code == 400
    assert post(server, "usage-a", {**chat(max_tokens=4), "model": "no-such-model"}, ids["vllm404"]).status_code == 404
    assert post(server, "usage-a", chat(max_tokens=10**6), ids["toolong"]).status_code == 400
    assert post(server, "usage-a", {"model": MODEL, "prompt": "x", "max_tokens": 3}, ids["completion"],
                path="/v1/completions").status_code == 200  # fmt: skip
    remote = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    assert post(server, "usage-a", chat(remote, max_tokens=4), ids["imageurl"]).status_code == 400
    # Both of usage-a's units held by one n=2 stream: the next request is over its budget.
    holder = rid("holder")
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      json=chat(max_tokens=2000, ignore_eos=True, stream=True, n=2),
                      headers={"Authorization": f"Bearer {server.keys['usage-a']}", "x-request-id": holder}) as held:  # fmt: skip
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: a dropped line iterator closes the stream (the client leaves)
        next(lines)  # admitted and streaming: it holds both units until it ends
        assert post(server, "usage-a", chat(max_tokens=4), ids["overbudget"]).status_code == 429
    # (leaving the block closed the stream: the holder left early)
    leave_mid_stream(server, "usage-a", ids["gone"])

    found = records_of(server, holder, *ids.values())
    assert all(len(records) == 1 for records in found.values()), {k: len(v) for k, v in found.items()}
    one = {name: found[ids[name]][0] for name in ids}
    for record in one.values():
        jsonschema.Draft202012Validator(SCHEMA).validate(record)
    expected = {
        "ok": ("completed", 200, None), "stream": ("completed", 200, None),
        "badkey": ("rejected_invalid_api_key", 401, "invalid_api_key"),
        "notfound": ("rejected_not_found", 404, "not_found"),
        "badjson": ("rejected_invalid_json", 400, "invalid_json"),
        "vllm404": ("completed", 404, "model_not_found"),
        "toolong": ("rejected_context_length", 400, "context_length_exceeded"),
        "completion": ("completed", 200, None),
        "imageurl": ("rejected_image_url", 400, "image_url_not_allowed"),
        "overbudget": ("rejected_concurrency_limit", 429, "concurrency_limit_exceeded"),
        "gone": ("evicted_client_gone", 200, None),
    }  # fmt: skip
    assert {k: (r["outcome"], r["status"], r["error_code"]) for k, r in one.items()} == expected
    key_id = hash_key(server.keys["usage-a"])[:12]
    assert one["ok"]["account"] == "usage-a" and one["ok"]["key_id"] == key_id and one["ok"]["plan"] == "two"
    assert one["badkey"]["account"] is None and one["vllm404"]["model"] == "other"
    assert one["stream"]["stream"] is True and one["ok"]["stream"] is False
    assert one["completion"]["endpoint"] == "/v1/completions" and one["imageurl"]["images"] == 1
    assert found[holder][0]["units"] == 2 and found[holder][0]["outcome"] == "evicted_client_gone"
    assert one["overbudget"]["units"] == 0
    gone = one["gone"]
    assert gone["client_left"] is True and gone["units"] == 1
    assert 0 < gone["completion_tokens"] < 2000  # what the engine generated before the client left


def test_token_counts_are_the_engines_own_also_for_streams_without_usage(server):
    ids = [rid("tokens") for _ in range(4)]
    plain = post(server, "usage-a", chat(max_tokens=7), ids[0]).json()["usage"]
    pair = post(server, "usage-a", chat(max_tokens=5, n=2, ignore_eos=True), ids[1]).json()["usage"]
    completion = post(server, "usage-a", {"model": MODEL, "prompt": ["one two", "three"], "max_tokens": 4,
                                          "ignore_eos": True}, ids[2], path="/v1/completions").json()["usage"]  # fmt: skip
    headers = {"Authorization": f"Bearer {server.keys['usage-a']}", "x-request-id": ids[3]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=headers, timeout=120,
                      json=chat(max_tokens=9, ignore_eos=True, stream=True)) as reply:  # fmt: skip
        events = [line for line in reply.iter_lines() if line.startswith("data: {")]
    found = records_of(server, *ids)
    for request_id, usage in zip(ids, (plain, pair, completion)):
        record = found[request_id][0]
        assert (record["prompt_tokens"], record["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert pair["completion_tokens"] == 10 and completion["completion_tokens"] == 8
    streamed = found[ids[3]][0]
    assert not any('"usage"' in e and '"prompt_tokens"' in e for e in events)  # the stream never carried usage
    assert streamed["completion_tokens"] == 9 and streamed["prompt_tokens"] == plain["prompt_tokens"]


def test_unit_seconds_of_a_long_stream_are_its_held_time(server):
    request_id = rid("held")
    headers = {"Authorization": f"Bearer {server.keys['usage-a']}", "x-request-id": request_id}
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=headers, timeout=120,
                      json=chat(max_tokens=1500, ignore_eos=True, stream=True, n=2)) as reply:  # fmt: skip
        first = None
        for line in reply.iter_lines():
            first = first or time.monotonic()
        ended = time.monotonic()
    [record] = records_of(server, request_id)[request_id]
    held = ended - started
    assert held > 1.0, "the stream was too short to measure"
    assert record["units"] == 2
    # units x (admission -> release), where release is the last chunk's send: the server's
    # own admission-to-end time, and within the client's whole wait
    served = record["e2e_s"] - record["queue_wait_s"]
    assert record["unit_seconds"] == pytest.approx(2 * served, rel=0.02, abs=0.1)
    assert 0.5 * held <= record["unit_seconds"] / 2 <= held
    assert record["ttft_s"] <= first - started + 0.05 and record["e2e_s"] <= held


def test_per_account_metrics_match_the_records(server):
    ids = [rid("acct") for _ in range(3)]
    before = {name: metric(server.url, name, account="usage-b") for name in
              ("medgemma_account_unit_seconds_total", "medgemma_account_tokens_total",
               "medgemma_account_requests_total")}  # fmt: skip
    for request_id in ids[:2]:
        assert post(server, "usage-b", chat(max_tokens=6), request_id).status_code == 200
    assert post(server, "usage-b", chat(max_tokens=10**6), ids[2]).status_code == 400
    records = [r for rs in records_of(server, *ids).values() for r in rs]
    after = {name: metric(server.url, name, account="usage-b") for name in before}
    assert after["medgemma_account_requests_total"] - before["medgemma_account_requests_total"] == 3
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in records if r["prompt_tokens"] is not None)
    assert after["medgemma_account_tokens_total"] - before["medgemma_account_tokens_total"] == tokens
    unit_seconds = sum(r["unit_seconds"] for r in records)
    assert after["medgemma_account_unit_seconds_total"] - before["medgemma_account_unit_seconds_total"] == pytest.approx(unit_seconds)
    assert metric(server.url, "medgemma_account_inflight_units", account="usage-b") == 0
    assert metric(server.url, "medgemma_account_requests_total", account="usage-b",
                  outcome="rejected_context_length") >= 1  # fmt: skip


def test_the_usage_report_of_the_servers_own_file_sums_its_records(server, capsys):
    from serving import cli

    request_id = rid("report")
    assert post(server, "usage-b", chat(max_tokens=3), request_id).status_code == 200
    records_of(server, request_id)  # written: the file holds every record so far
    assert cli.main(["usage", str(server.usage_log), "--by", "account", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    records = [r for r in written(server) if r["kind"] == "request"]
    for row in report["groups"]:
        if row["account"] in ("usage-a", "usage-b"):
            mine = [r for r in records if r["account"] == row["account"]]
            assert row["requests"] == len(mine)
            assert row["completion_tokens"] == sum(r["completion_tokens"] or 0 for r in mine)
            assert row["unit_seconds"] == pytest.approx(sum(r["unit_seconds"] for r in mine))
    assert report["total"]["requests"] == len(records)
