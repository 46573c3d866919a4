"""Limits that need non-default settings, on a second real server: a trickling body, a
client that never reads, remote image URLs (enabled for one host) and keys reloads."""

from __future__ import annotations

import http.server
import io
import json
import re
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
from PIL import Image

from serving.admission.keyadmin import add_key
from tests.live_server import launch, raw_post, stop, wait_for, wait_ready, write_keys
from tests.metrics_text import metric as metric_of

BODY_TIMEOUT_S = 3
STALL_TIMEOUT_S = 4


def png(width: int, height: int, noise: bool = False) -> bytes:
    picture = Image.effect_noise((width, height), 80).convert("RGB") if noise else Image.new("RGB", (width, height), 70)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


class ImageHost(http.server.BaseHTTPRequestHandler):
    small = png(64, 64)
    big = png(1100, 1100, noise=True)  # > 1 MiB of PNG

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/redirect.png":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/ok.png")
            self.end_headers()
            return
        if self.path == "/slow.png":
            time.sleep(6)
        body = self.big if self.path == "/big.png" else self.small
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory, server):
    root = tmp_path_factory.mktemp("limits")
    keys_file = root / "keys.yaml"
    keys = write_keys(keys_file, {"main": "big"})
    srv = launch(
        root, keys_file, keys,
        "--body-timeout-s", str(BODY_TIMEOUT_S), "--stream-stall-timeout-s", str(STALL_TIMEOUT_S),
        "--remote-image-hosts", "127.0.0.1", "--remote-image-private-networks",
        "--remote-image-max-mib", "1", "--remote-image-timeout-s", "2",
        "--keys-reload-interval-s", "3600",  # SIGHUP alone reloads here: the poll never looks
        dev_model_dir=server.dev_model_dir,
    )  # fmt: skip
    srv.keys_file = keys_file
    try:
        wait_ready(srv)
        yield srv
    finally:
        stop(srv, signal.SIGKILL)


def post_chat(srv, body: dict, key: str | None = None, timeout=60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key or srv.keys['main']}"}
    return httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def metric(srv, name: str, **labels: str) -> float:
    return metric_of(srv.url, name, **labels)


def test_a_trickling_body_gets_408_after_the_body_timeout(limits_server):
    srv = limits_server
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + srv.keys["main"].encode() + b"\r\nContent-Length: 1000\r\n\r\n{"
        )
        started = time.monotonic()
        sock.setblocking(False)
        answer = b""
        while time.monotonic() - started < BODY_TIMEOUT_S + 10 and b"\r\n\r\n" not in answer:
            try:
                sock.send(b" ")  # one byte every 0.5 s: never the whole body
            except OSError:
                pass
            time.sleep(0.5)
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
        took = time.monotonic() - started
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
        sock.setblocking(True)
        while len(body) < length:  # the whole error body, not just the status line
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    assert head.startswith(b"HTTP/1.1 408"), answer[:200]
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error", error
    assert BODY_TIMEOUT_S - 0.5 < took < BODY_TIMEOUT_S + 30  # wide: this VM stalls processes
    srv.assert_alive()


def server_send_queue(server_port: int, client_port: int) -> int:
    """Bytes the server's socket holds for one client (ss's Send-Q: unsent + unacknowledged)."""
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( sport = :{server_port} and dport = :{client_port} )"],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    return int(out[1]) if out else 0


def test_a_client_that_never_reads_is_ended_and_its_unit_released(limits_server):
    """What the client has not read counts, not what the kernel accepted: the server's
    socket never holds megabytes for it (it held up to 4 MiB, ~20,000 events, before the
    stall timeout could even start), and its unit is released about a stall timeout after
    it stopped reading."""
    srv = limits_server
    port = int(srv.url.rsplit(":", 1)[1])
    body = {"model": "medgemma-4b-it", "messages": [{"role": "user", "content": "Describe it."}],
            "max_tokens": 30000, "min_tokens": 30000, "stream": True}  # fmt: skip
    sock = raw_post(srv, "/v1/chat/completions", srv.keys["main"], body, rcvbuf=4096)  # a small window
    try:
        began = time.monotonic()
        assert wait_for(lambda: metric(srv, "medgemma_inflight_units", plan="big") == 1, 30)
        # Never read. The server's send blocks within its unsent limit, the stall timeout runs.
        held = []
        deadline = time.monotonic() + STALL_TIMEOUT_S + 60
        while metric(srv, "medgemma_inflight_units", plan="big") != 0 and time.monotonic() < deadline:
            held.append(server_send_queue(port, sock.getsockname()[1]))
            time.sleep(0.2)
        released_after = time.monotonic() - began
        assert metric(srv, "medgemma_inflight_units", plan="big") == 0, (released_after, max(held, default=0))
        assert len(held) >= 5, held  # watched for a while before the release, not after it
        assert max(held) < 2**20, f"the server's socket held {max(held)} bytes for a client that reads nothing"
        assert released_after < STALL_TIMEOUT_S + 30, released_after  # wide: this VM stalls processes
        assert wait_for(lambda: metric(srv, "vllm:num_requests_running") == 0, 30)
        assert "stopped reading" in srv.log()
    finally:
        sock.close()
    srv.assert_alive()


def test_a_batch_whose_client_never_reads_has_every_engine_request_aborted(limits_server):
    """The stall path aborts by id (vLLM's generator may sit suspended in our blocked send):
    the abort must reach each prompt's engine request, which vLLM names <id>-<i>."""
    srv = limits_server
    body = {"model": "medgemma-4b-it", "prompt": [f"Report {i}:" for i in range(8)],
            "max_tokens": 30000, "min_tokens": 30000, "stream": True}  # fmt: skip
    sock = raw_post(srv, "/v1/completions", srv.keys["main"], body, rcvbuf=4096)
    try:
        assert wait_for(lambda: metric(srv, "vllm:num_requests_running") == 8, 60)
        assert metric(srv, "medgemma_inflight_units", plan="big") == 8
        # Never read: ended as a stall, then every one of the 8 engine requests is aborted.
        assert wait_for(lambda: metric(srv, "medgemma_inflight_units", plan="big") == 0, STALL_TIMEOUT_S + 60)
        assert wait_for(lambda: metric(srv, "vllm:num_requests_running") == 0, 10), \
            metric(srv, "vllm:num_requests_running")  # fmt: skip
    finally:
        sock.close()
    srv.assert_alive()


def image_chat(url: str) -> dict:
    return {
        "model": "medgemma-4b-it", "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]}],
    }  # fmt: skip


def test_remote_images_only_from_the_allowed_host_within_limits(limits_server, image_host):
    srv = limits_server
    assert post_chat(srv, image_chat(image_host + "/ok.png")).status_code == 200
    other_name = image_host.replace("127.0.0.1", "localhost")  # same server, host not allowed
    refused = post_chat(srv, image_chat(other_name + "/ok.png"))
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "image_url_not_allowed"
    expected = {  # no redirects, at most 1 MiB, within 2 s
        "/redirect.png": (400, "invalid_request"), "/big.png": (422, "image_fetch_failed"),
        "/slow.png": (504, "upstream_timeout"),
    }  # fmt: skip
    for path, (status, code) in expected.items():
        started = time.monotonic()
        response = post_chat(srv, image_chat(image_host + path))
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text[:300]
        assert time.monotonic() - started < 60
    assert "Traceback" not in srv.log()
    assert metric(srv, "medgemma_inflight_units") == 0
    srv.assert_alive()


def test_keys_reload_on_sighup_and_a_bad_file_keeps_the_old_keys(limits_server):
    srv = limits_server
    hi = {"model": "medgemma-4b-it", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    good = srv.keys_file.read_text()
    try:
        new_key = add_key(srv.keys_file, "newcomer", "one")
        time.sleep(1)
        assert post_chat(srv, hi, new_key).status_code == 401  # not reloaded yet: no poll here
        srv.send_signal(signal.SIGHUP)
        assert wait_for(lambda: post_chat(srv, hi, new_key).status_code == 200, 10)
        with_newcomer = srv.keys_file.read_text()

        # Wrong values and wrong structure: each keeps the old keys, and says why.
        for n, bad in enumerate([with_newcomer.replace("concurrency: 1", "concurrency: lots"),
                                 "plans:\n- {concurrency: 2}\n", "keys: {a: b}\n",
                                 with_newcomer.replace("concurrency: 1", "concurrency: true")], start=1):  # fmt: skip
            srv.keys_file.write_text(bad)
            srv.send_signal(signal.SIGHUP)
            assert wait_for(lambda n=n: srv.log().count("keeping the previous keys") >= n, 10), srv.log()[-2000:]
            assert post_chat(srv, hi, new_key).status_code == 200
            assert post_chat(srv, hi, srv.keys["main"]).status_code == 200
        assert metric(srv, "medgemma_keys_reloads_total", result="error") == 4

        # The next good file is picked up: the newcomer is gone again.
        srv.keys_file.write_text(good)
        srv.send_signal(signal.SIGHUP)
        assert wait_for(lambda: post_chat(srv, hi, new_key).status_code == 401, 10)
        assert post_chat(srv, hi, srv.keys["main"]).status_code == 200
        assert new_key not in srv.log() and srv.keys["main"] not in srv.log()
        assert "Traceback" not in srv.log()
    finally:
        srv.keys_file.write_text(good)
