"""wait-idle: the preStop drain for engine pods under Ray Serve, against a real HTTP server."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serving.idle import busy_requests, wait_idle

TEXT = """# HELP medgemma_inflight_units Concurrency units held
# TYPE medgemma_inflight_units gauge
medgemma_inflight_units{plan="pro"} 2.0
medgemma_inflight_units{plan="free"} 1.0
medgemma_queue_depth 1.0
medgemma_queue_wait_seconds_count 4.0
vllm:num_requests_running{engine="0"} 3.0
"""


def test_busy_counts_units_and_queued_requests_only():
    assert busy_requests(TEXT) == 4.0
    assert busy_requests(TEXT.replace(" 2.0", " 0.0").replace(" 1.0", " 0.0")) == 0.0


def serve(state):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = state["text"].encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_waits_until_the_requests_are_done():
    state = {"text": TEXT}
    server, url = serve(state)
    try:
        threading.Timer(0.3, lambda: state.update(text="medgemma_queue_depth 0.0\n")).start()
        began = time.monotonic()
        assert wait_idle(url, 10, poll_s=0.05) == 0
        assert 0.3 <= time.monotonic() - began < 5
        state["text"] = TEXT  # never idle: gives up at the timeout
        began = time.monotonic()
        assert wait_idle(url, 0.3, poll_s=0.05) == 0
        assert time.monotonic() - began >= 0.3
    finally:
        server.shutdown()


def test_nothing_listening_is_nothing_to_wait_for():
    server, url = serve({"text": ""})
    server.shutdown()
    server.server_close()
    began = time.monotonic()
    assert wait_idle(url, 10, poll_s=0.05) == 0
    assert time.monotonic() - began < 5
