"""Key rotation, revocation and expiry on the real server, through its hot reload, while
requests run: in-flight requests of a revoked key finish, new ones get 401, and every change
lands in the audit trail (the CLI's audit file and the server's usage log)."""

from __future__ import annotations

import json
import threading
import time

import httpx

from serving.admission import keyadmin
from serving.admission.keys import hash_key
from tests.live_server import wait_for

MODEL = "medgemma-4b-it"


def status(server, key: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}).status_code  # fmt: skip


def key_id(key: str) -> str:
    return hash_key(key)[:12]


class LongStream(threading.Thread):
    """A stream of ``max_tokens`` tokens with ``key``; records its status, events and end."""

    def __init__(self, server, key: str, request_id: str, max_tokens: int = 4000):
        super().__init__(daemon=True)
        self.server, self.key, self.request_id, self.max_tokens = server, key, request_id, max_tokens
        self.status, self.events, self.done, self.first = None, [], False, threading.Event()

    def run(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": self.max_tokens,
                "ignore_eos": True, "stream": True}  # fmt: skip
        headers = {"Authorization": f"Bearer {self.key}", "x-request-id": self.request_id}
        with httpx.stream("POST", self.server.url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=300) as reply:  # fmt: skip
            self.status = reply.status_code
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line)
                    self.first.set()
        self.done = True


def test_rotation_revocation_and_a_grace_period_take_effect_without_a_restart(server):
    path = server.keys_file
    old = keyadmin.add_key(path, "lifecycle", "two")
    assert wait_for(lambda: status(server, old) == 200, 15), "the new key was not picked up"

    stream = LongStream(server, old, f"lifecycle-{time.time_ns()}")
    stream.start()
    assert stream.first.wait(60), "the stream never started"

    new = keyadmin.rotate_key(path, "lifecycle", grace_s=3600)
    assert wait_for(lambda: status(server, new) == 200, 15), "the rotated key was not picked up"
    assert status(server, old) == 200  # the old key works through its grace period

    keyadmin.revoke_key(path, key_id(old))
    assert wait_for(lambda: status(server, old) == 401, 15), "the revoked key still works"
    assert not stream.done, "the stream ended before the revocation: make it longer"
    assert status(server, new) == 200
    stream.join(300)
    # the request in flight when its key was revoked ran to its end
    assert stream.status == 200 and stream.events[-1] == "data: [DONE]"
    assert sum('"content"' in event for event in stream.events) >= 3000

    # A second rotation with a short grace: the key it replaces works until the grace ends,
    # then stops at that instant, with no reload in between.
    grace_s = 30
    newer = keyadmin.rotate_key(path, "lifecycle", grace_s=grace_s)
    ends = time.time() + grace_s
    assert wait_for(lambda: status(server, newer) == 200, 15), "the second rotated key was not picked up"
    if ends - time.time() > 2:
        assert status(server, new) == 200  # within its grace
    time.sleep(max(0.0, ends - time.time()) + 1.5)  # the file keeps whole seconds
    assert status(server, new) == 401 and status(server, newer) == 200

    # The audit trail: the CLI's own lines beside the keys file, and what the server saw.
    cli = [json.loads(line) for line in path.with_name(path.name + ".audit.jsonl").read_text().splitlines()]
    cli_seen = {(r["action"], r["key_id"]) for r in cli if r["account"] == "lifecycle"}
    server_seen = {(r["action"], r["key_id"]) for r in changes(server) if r["account"] == "lifecycle"}
    expected = {("added", key_id(old)), ("added", key_id(new)), ("expiry_set", key_id(old)),
                ("revoked", key_id(old)), ("added", key_id(newer)), ("expiry_set", key_id(new))}  # fmt: skip
    assert expected <= cli_seen and expected <= server_seen
    assert all(r["source"] == "cli" for r in cli) and all(r["source"] == "reload" for r in changes(server))
    audit_text = path.with_name(path.name + ".audit.jsonl").read_text() + server.usage_log.read_text()
    assert all(k not in audit_text and hash_key(k) not in audit_text for k in (old, new, newer))

    # The stream's usage record names the key it ran under.
    records = [json.loads(line) for line in server.usage_log.read_text().splitlines()]
    [record] = [r for r in records if r.get("request_id") == stream.request_id]
    assert record["key_id"] == key_id(old) and record["outcome"] == "completed" and record["completion_tokens"] == 4000


def changes(server) -> list[dict]:
    lines = [json.loads(line) for line in server.usage_log.read_text().splitlines()]
    return [r for r in lines if r.get("kind") == "key_change"]
