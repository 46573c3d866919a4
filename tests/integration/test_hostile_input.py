"""Hostile and malformed input against the real server: each case's status and error code.

After the catalogue the server is healthy and no unit is held. Every error body is
OpenAI-shaped with a string ``code`` (ours, or vLLM's status mapped to one)."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from dataclasses import dataclass

import httpx
import pytest
from PIL import Image

from tests.metrics_text import samples, scrape

MODEL = "medgemma-4b-it"
HI = [{"role": "user", "content": "hi"}]


def image(width=64, height=64, fmt="PNG", mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 100).save(buffer, fmt)
    return buffer.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def with_image(url: str, text="What does this show?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def with_part(part: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What does this show?"}, part]}]


@dataclass
class Case:
    name: str
    body: dict | bytes  # a dict is merged over {"model", "max_tokens": 4}; bytes are sent raw
    status: int
    code: str | None  # None: a success
    path: str = "/v1/chat/completions"


CATALOGUE = [
    # Not JSON, or not the right JSON.
    Case("malformed json", b'{"model": "medgemma-4b-it", "messages": [', 400, "invalid_json"),
    Case("json array", b"[1, 2, 3]", 400, "invalid_json"),
    Case("empty body", b"", 400, "invalid_json"),
    Case("deeply nested", b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json"),
    Case("lone surrogate", b'{"model":"medgemma-4b-it","messages":[{"role":"user","content":"\\ud800"}]}', 400, "invalid_json"),
    Case("messages missing", {"messages": None}, 400, "invalid_request"),
    Case("messages not a list", {"messages": "hi"}, 400, "invalid_request"),
    Case("empty messages", {"messages": []}, 400, "invalid_request"),
    Case("content of wrong type", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_request"),
    Case("unknown model", {"model": "gpt-4", "messages": HI}, 404, "model_not_found"),
    Case("model of wrong type", {"model": 5, "messages": HI}, 400, "invalid_request"),
    # Conversation structure.
    Case("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request"),
    Case("roles do not alternate", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "invalid_request"),
    Case("assistant first", {"messages": [{"role": "assistant", "content": "a"}]}, 400, "invalid_request"),
    Case("unknown content part", {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, 400, "invalid_request"),
    Case("image part without url", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "invalid_request"),
    # Generation parameters.
    Case("max_tokens negative", {"messages": HI, "max_tokens": -1}, 400, "invalid_request"),
    Case("max_tokens absurd", {"messages": HI, "max_tokens": 10**12}, 400, "context_length_exceeded"),
    Case("max_tokens a string", {"messages": HI, "max_tokens": "lots"}, 400, "invalid_request"),
    Case("prompt beyond the context", {"messages": [{"role": "user", "content": "word " * 40_000}]}, 400, "context_length_exceeded"),
    Case("n beyond the plan", {"messages": HI, "n": 1000}, 400, "request_exceeds_plan"),
    Case("n within the plan", {"messages": HI, "n": 2}, 200, None),
    Case("temperature negative", {"messages": HI, "temperature": -1}, 400, "invalid_request"),
    Case("temperature huge", {"messages": HI, "temperature": 1e9}, 400, "invalid_request"),
    Case("top_p above 1", {"messages": HI, "top_p": 2}, 400, "invalid_request"),
    Case("top_k negative", {"messages": HI, "top_k": -5}, 400, "invalid_request"),
    Case("presence_penalty huge", {"messages": HI, "presence_penalty": 1e9}, 400, "invalid_request"),
    Case("too many top_logprobs", {"messages": HI, "logprobs": True, "top_logprobs": 100_000}, 400, "invalid_request"),
    Case("logit_bias out of vocabulary", {"messages": HI, "logit_bias": {"999999999": 100}}, 400, "invalid_request"),
    Case("seed beyond 64 bits", {"messages": HI, "seed": 2**70}, 400, "invalid_request"),
    Case("malformed tools", {"messages": HI, "tools": [{"type": "function"}]}, 400, "invalid_request"),
    Case("NUL characters in text", {"messages": [{"role": "user", "content": "a\u0000b"}]}, 200, None),
    # Images.
    Case("too many images", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image())}}] * 6}]}, 400, "too_many_images"),
    Case("2,000 tiny images", {"messages": [{"role": "user", "content": [{"image_url": data_url(image(1, 1))}] * 2000}]}, 400, "too_many_images"),
    Case("corrupt image", {"messages": with_image(data_url(b"\x89PNG\r\n\x1a\nGARBAGE"))}, 400, "invalid_request"),
    Case("truncated image", {"messages": with_image(data_url(image(200, 200)[:300]))}, 400, "invalid_request"),
    Case("decompression bomb", {"messages": with_image(data_url(bomb_png()))}, 400, "image_too_large"),
    Case("image over the pixel limit", {"messages": with_image(data_url(bomb_png(8000, 8000)))}, 400, "image_too_large"),
    Case("unsupported format (GIF stub)", {"messages": with_image(data_url(b"GIF89a" + b"\0" * 20, "image/gif"))}, 400, "invalid_request"),
    Case("SVG image", {"messages": with_image(data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"))}, 400, "invalid_request"),
    Case("non-image data URL", {"messages": with_image("data:text/plain;base64," + base64.b64encode(b"hello").decode())}, 400, "invalid_image"),
    Case("invalid base64", {"messages": with_image("data:image/png;base64,!!!not-base64")}, 400, "invalid_request"),
    Case("remote URL (cloud metadata)", {"messages": with_image("http://169.254.169.254/latest/meta-data")}, 400, "image_url_not_allowed"),
    Case("remote URL (public host)", {"messages": with_image("https://example.org/x.png")}, 400, "image_url_not_allowed"),
    Case("file URL", {"messages": with_image("file:///etc/passwd")}, 400, "image_url_not_allowed"),
    # Media parts as vLLM's parser reads them: by their keys, whatever the type says.
    Case("typeless part, link-local URL", {"messages": with_part({"image_url": "http://169.254.169.254/latest/meta-data"})}, 400, "image_url_not_allowed"),
    Case("typeless part, public URL", {"messages": with_part({"image_url": {"url": "https://example.org/x.png"}})}, 400, "image_url_not_allowed"),
    Case("typeless part, bomb PNG", {"messages": with_part({"image_url": data_url(bomb_png())})}, 400, "image_too_large"),
    Case("text part with a uuid and an image URL", {"messages": with_part({"type": "text", "text": "x", "uuid": "u", "image_url": "http://127.0.0.1:9/x.png"})}, 400, "unsupported_media"),
    # vLLM takes a uuid as the image's cache identity, and a uuid alone as a reference to it.
    Case("image with a client-chosen uuid", {"messages": with_part({"type": "image_url", "image_url": {"url": data_url(image(1, 1))}, "uuid": "scan-1"})}, 400, "unsupported_media"),
    Case("uuid alone (a cached image by id)", {"messages": with_part({"type": "image_url", "image_url": None, "uuid": "scan-1"})}, 400, "unsupported_media"),
    Case("image with a null uuid", {"messages": with_part({"type": "image_url", "image_url": {"url": data_url(image(1, 1))}, "uuid": None})}, 200, None),
    Case("input_image part, loopback URL", {"messages": with_part({"type": "input_image", "image_url": "http://127.0.0.1:9/x.png"})}, 400, "image_url_not_allowed"),
    Case("image_embeds part", {"messages": with_part({"type": "image_embeds", "image_embeds": "AAAA"})}, 400, "unsupported_media"),
    Case("typeless image_embeds", {"messages": with_part({"image_embeds": {"image_embeds": "AAAA"}})}, 400, "unsupported_media"),
    Case("input_audio part", {"messages": with_part({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})}, 400, "unsupported_media"),
    Case("typeless audio_url", {"messages": with_part({"audio_url": "http://127.0.0.1:9/a.wav"})}, 400, "unsupported_media"),
    Case("video_url part", {"messages": with_part({"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/v.mp4"}})}, 400, "unsupported_media"),
    Case("file part", {"messages": with_part({"type": "file", "file": {"file_data": "AAAA", "filename": "a.pdf"}})}, 400, "unsupported_media"),
    Case("prompt_embeds part", {"messages": with_part({"type": "prompt_embeds", "data": "AAAA"})}, 400, "unsupported_media"),
    Case("1x1 image", {"messages": with_image(data_url(image(1, 1)))}, 200, None),
    Case("1x1 image in a typeless part", {"messages": with_part({"image_url": data_url(image(1, 1))})}, 200, None),
    Case("grayscale image", {"messages": with_image(data_url(image(64, 64, mode="L")))}, 200, None),
    Case("CMYK JPEG", {"messages": with_image(data_url(image(64, 64, "JPEG", "CMYK"), "image/jpeg"))}, 200, None),
    # Routes around the budget.
    Case("Responses API", {"input": "hi"}, 404, "not_found", path="/v1/responses"),
    Case("Anthropic Messages API", {"messages": HI}, 404, "not_found", path="/v1/messages"),
    Case("raw generate", {"prompt": "hi"}, 404, "not_found", path="/inference/v1/generate"),
    Case("completions with a bad prompt", {"prompt": {"x": 1}}, 400, "invalid_request", path="/v1/completions"),
]  # fmt: skip


def send(server, case: Case, key: str) -> httpx.Response:
    if isinstance(case.body, bytes):
        content = case.body
    else:
        body = {"model": MODEL, "max_tokens": 4, **case.body}
        content = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    return httpx.post(server.url + case.path, content=content, headers=headers, timeout=120)


def inflight_units(server) -> dict[str, float]:
    """medgemma_inflight_units by plan; an error if the server does not expose it."""
    units = {labels["plan"]: value for name, labels, value in samples(scrape(server.url))
             if name == "medgemma_inflight_units"}  # fmt: skip
    assert "big" in units, f"no medgemma_inflight_units for the test's plan: {units}"
    return units


def test_the_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 30
    assert len({c.name for c in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.name for c in CATALOGUE])
def test_hostile_request(server, case):
    response = send(server, case, server.keys["main"])
    assert response.status_code == case.status, response.text[:500]
    assert response.headers.get("x-request-id")
    if case.code is None:
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == case.code, error
    assert isinstance(error["message"], str) and error["message"]


def test_oversized_bodies_get_413_by_header_and_by_bytes(server):
    headers = {"Authorization": f"Bearer {server.keys['main']}", "content-type": "application/json"}
    big = b'{"model": "medgemma-4b-it", "messages": [{"role": "user", "content": "' + b"a" * (21 * 2**20) + b'"}]}'
    response = httpx.post(server.url + "/v1/chat/completions", content=big, headers=headers, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the bytes read decide
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(22):
            yield b"a" * 2**20

    response = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers=headers, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_after_the_catalogue_the_server_is_healthy_and_holds_no_units(server, client):
    server.assert_alive()
    assert all(value == 0 for value in inflight_units(server).values()), inflight_units(server)
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    assert reply.choices[0].message.content is not None


def test_no_media_part_shape_makes_the_server_connect_anywhere(server):
    """A listener on loopback (IPv4 and IPv6) counts connections while every URL-carrying
    part shape points at it: each is refused and nothing connects. (vLLM's never-matching
    allow-list, the second line of defence, is checked in tests/unit/test_engine.py.)"""
    import socket
    import threading

    listeners = [socket.create_server(("127.0.0.1", 0)), socket.create_server(("::1", 0), family=socket.AF_INET6)]
    connections, stop = [], threading.Event()

    def accept(listener):
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connections.append(listener.accept()[0])
            except TimeoutError:
                continue

    threads = [threading.Thread(target=accept, args=(listener,), daemon=True) for listener in listeners]
    for thread in threads:
        thread.start()
    port, port6 = (listener.getsockname()[1] for listener in listeners)
    url = f"http://127.0.0.1:{port}/x"
    parts = [
        {"image_url": url}, {"image_url": {"url": url}}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "x", "uuid": "u", "image_url": url}, {"type": "input_image", "image_url": url},
        {"audio_url": url}, {"type": "audio_url", "audio_url": {"url": url}}, {"video_url": {"url": url}},
        {"type": "video_url", "video_url": {"url": url}}, {"uuid": "u", "video_url": url},
        {"image_url": f"http://localhost:{port}/x"}, {"image_url": f"http://[::1]:{port6}/x"},
        {"image_url": {"url": f"http://[::1]:{port6}/x"}, "uuid": "u"},
    ]  # fmt: skip
    try:
        for part in parts:
            response = send(server, Case("", {"messages": with_part(part)}, 400, None), server.keys["main"])
            assert 400 <= response.status_code < 500, (part, response.status_code, response.text[:300])
            assert response.json()["error"]["code"] in ("image_url_not_allowed", "unsupported_media"), part
        time.sleep(0.5)
        assert connections == [], f"the server connected to the loopback listener {len(connections)} times"
    finally:
        stop.set()
        for thread, listener in zip(threads, listeners):
            thread.join(5)
            listener.close()
        for conn in connections:
            conn.close()
