"""One request cannot stall everyone else's: while a stream runs on the real server, a
19 MiB text body and a body of 2,000 tiny images are refused, and the running stream's
largest gap between two events stays under a second (it was 25-28 s for the text body)."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
from PIL import Image

MAX_GAP_S = 1.0  # a wide margin on this machine's stalls, far below the 25 s it was


def stream_event_times(url: str, key: str, started, stop, results) -> None:
    """A long stream in its own process (a busy stream thread would starve the test of the
    GIL): reports the CLOCK_MONOTONIC time of every data event until told to stop."""
    started.put(True)
    body = {"model": "medgemma-4b-it", "messages": [{"role": "user", "content": "Describe a chest film."}],
            "max_tokens": 30000, "min_tokens": 30000, "stream": True}  # fmt: skip
    times = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: "):
                times.append(time.monotonic())
                if len(times) == 5:
                    started.put(True)  # streaming now
            if stop.is_set():
                break
    results.put(times)


def tiny_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), 90).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_huge_bodies_do_not_stall_a_running_stream(server, spawn_client):
    context = spawn_client.context
    started, stop, results = context.Queue(), context.Event(), context.Queue()
    spawn_client(stream_event_times, server.url, server.keys["main"], started, stop, results)
    started.get(timeout=120)
    started.get(timeout=120)  # five events in: the stream runs

    headers = {"Authorization": f"Bearer {server.keys['main']}", "content-type": "application/json"}
    text = json.dumps({"model": "medgemma-4b-it", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "chest film " * (19 * 2**20 // 11)}]}).encode()  # fmt: skip
    images = json.dumps({"model": "medgemma-4b-it", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": tiny_png()}} for _ in range(2000)]}]}).encode()  # fmt: skip
    assert 18 * 2**20 < len(text) < 20 * 2**20
    window_start = time.monotonic()
    answers = {}
    with httpx.Client(timeout=120) as client:
        for name, body in (("text", text), ("images", images)):
            began = time.monotonic()
            response = client.post(server.url + "/v1/chat/completions", content=body, headers=headers)
            answers[name] = (response.status_code, response.json()["error"]["code"], round(time.monotonic() - began, 2))
    window_end = time.monotonic() + 0.5
    time.sleep(1.0)
    stop.set()
    times = results.get(timeout=60)

    assert answers["text"][:2] == (400, "context_length_exceeded"), answers
    assert answers["images"][:2] == (400, "too_many_images"), answers
    inside = [t for t in times if window_start - MAX_GAP_S <= t <= window_end + MAX_GAP_S]
    assert inside and inside[0] <= window_start and inside[-1] >= window_end, (len(times), answers)
    gaps = [b - a for a, b in zip(inside, inside[1:])]
    assert max(gaps) < MAX_GAP_S, (f"largest gap {max(gaps):.2f}s while the bodies were handled", answers)
