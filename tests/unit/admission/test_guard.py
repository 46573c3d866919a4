"""The request guard: body limits, JSON, image headers and the remote-URL policy."""

import asyncio
import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from serving.admission.guard import GuardSettings, RequestGuard
from serving.admission.outcomes import AdmissionError, Outcome


def run(coro):
    return asyncio.run(coro)


def receive_from(*chunks, delay_s=0.0):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        await asyncio.sleep(delay_s)
        return messages.pop(0)

    return receive


def scope(content_length=None):
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    return {"type": "http", "headers": headers}


def error_of(coro_or_fn) -> AdmissionError:
    with pytest.raises(AdmissionError) as caught:
        result = coro_or_fn()
        if asyncio.iscoroutine(result):
            run(result)
    return caught.value


def outcome_of(coro_or_fn) -> Outcome:
    return error_of(coro_or_fn).outcome


def test_body_is_read_whole_within_limits():
    guard = RequestGuard(GuardSettings(max_body_bytes=10))
    assert run(guard.read_body(scope(10), receive_from(b"12345", b"67890"))) == b"1234567890"


def test_body_over_the_limit_is_413_from_header_or_from_bytes():
    guard = RequestGuard(GuardSettings(max_body_bytes=10))
    assert outcome_of(lambda: guard.read_body(scope(11), receive_from(b"x"))) is Outcome.REJECTED_BODY_TOO_LARGE
    # A lying or missing Content-Length: the bytes decide, and reading stops there.
    assert outcome_of(lambda: guard.read_body(scope(), receive_from(b"123456", b"789012", b"x"))) is (
        Outcome.REJECTED_BODY_TOO_LARGE
    )


def test_a_trickling_body_times_out_with_408():
    guard = RequestGuard(GuardSettings(body_timeout_s=0.05))
    assert outcome_of(lambda: guard.read_body(scope(), receive_from(b"a", b"b", b"c", delay_s=0.03))) is (
        Outcome.REJECTED_BODY_TIMEOUT
    )


def test_a_client_leaving_mid_body_is_none():
    async def receive():
        return {"type": "http.disconnect"}

    assert run(RequestGuard().read_body(scope(), receive)) is None


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b'"text"', b"[" * 100000 + b"]" * 100000])
def test_anything_but_a_json_object_is_invalid_json(body):
    assert outcome_of(lambda: RequestGuard.parse(body)) is Outcome.REJECTED_INVALID_JSON


def image_bytes(width, height, fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), 90).save(buffer, fmt)
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG that declares width x height but carries almost no data (a decompression bomb)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def chat_with(url):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


def data_url(data, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_images_within_the_pixel_limit_pass():
    guard = RequestGuard(GuardSettings(max_image_pixels=64 * 64))
    run(guard.check_images(chat_with(data_url(image_bytes(64, 64)))))
    run(guard.check_images(chat_with(data_url(image_bytes(64, 64, "JPEG"), "image/jpeg"))))
    run(guard.check_images(chat_with(data_url(b"not an image at all"))))  # vLLM refuses it itself


@pytest.mark.parametrize("width,height", [(65, 64), (100_000, 100_000), (20_000, 20_000)])
def test_declared_dimensions_beyond_the_limit_are_refused_without_decoding(width, height):
    guard = RequestGuard(GuardSettings(max_image_pixels=64 * 64))
    url = data_url(png_header_only(width, height))
    assert outcome_of(lambda: guard.check_images(chat_with(url))) is Outcome.REJECTED_IMAGE_TOO_LARGE


def test_a_jpeg_whose_header_sits_past_the_prefix_is_still_measured():
    exif_padding = b"\xff\xe1" + struct.pack(">H", 65000) + b"\0" * 64998  # an APP1 segment
    jpeg = image_bytes(300, 200, "JPEG")
    padded = jpeg[:2] + exif_padding + exif_padding + jpeg[2:]  # SOF beyond 128 KiB
    guard = RequestGuard(GuardSettings(max_image_pixels=300 * 200 - 1))
    url = data_url(padded, "image/jpeg")
    assert outcome_of(lambda: guard.check_images(chat_with(url))) is Outcome.REJECTED_IMAGE_TOO_LARGE


def test_non_image_data_urls_are_invalid_images():
    url = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    assert outcome_of(lambda: RequestGuard().check_images(chat_with(url))) is Outcome.REJECTED_INVALID_IMAGE


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data", "https://example.org/x.png", "file:///etc/passwd", "ftp://h/x.png"],
)
def test_remote_and_file_urls_are_refused_by_default(url):
    assert outcome_of(lambda: RequestGuard().check_images(chat_with(url))) is Outcome.REJECTED_IMAGE_URL


def resolver(table):
    async def resolve(host, port):
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


def test_remote_urls_need_an_allowed_host_that_resolves_to_public_addresses():
    table = {"pacs.example.org": ["93.184.216.34"], "internal.example.org": ["10.0.0.5"],
             "meta.example.org": ["169.254.169.254"], "mixed.example.org": ["93.184.216.34", "127.0.0.1"]}  # fmt: skip
    hosts = frozenset(table) | {"nxdomain.example.org"}
    guard = RequestGuard(GuardSettings(remote_image_hosts=hosts), resolve=resolver(table))
    run(guard.check_images(chat_with("https://pacs.example.org/study/1.png")))
    for url in ("https://other.example.org/x.png", "http://internal.example.org/x.png",
                "http://meta.example.org/", "http://mixed.example.org/x", "http://nxdomain.example.org/x",
                "file://pacs.example.org/etc/passwd"):  # fmt: skip
        assert outcome_of(lambda u=url: guard.check_images(chat_with(u))) is Outcome.REJECTED_IMAGE_URL, url
    private_ok = RequestGuard(
        GuardSettings(remote_image_hosts=hosts, remote_image_private_networks=True), resolve=resolver(table)
    )
    run(private_ok.check_images(chat_with("http://internal.example.org/x.png")))


# --- media parts as vLLM 0.32 reads them, derived from its own content-part types --------

LOOPBACK = "http://127.0.0.1:9/x.png"


def vllm_content_part_types() -> list[type]:
    """Every TypedDict in vLLM's ChatCompletionContentPartParam union."""
    import types as pytypes
    from typing import Union, get_args, get_origin

    from vllm.renderers.chat_utils import ChatCompletionContentPartParam

    found, stack = [], [ChatCompletionContentPartParam]
    while stack:
        node = stack.pop()
        if get_origin(node) in (Union, pytypes.UnionType):
            stack.extend(get_args(node))
        elif hasattr(node, "__required_keys__"):
            found.append(node)
    return found


def literal_type(cls) -> str | None:
    import re

    annotation = cls.__annotations__.get("type")
    match = re.search(r"Literal\[['\"]([a-z_]+)['\"]\]", str(annotation))
    return match.group(1) if match else None


def sample_value(key: str, cls_name: str):
    if key.endswith("_url"):  # image_url, audio_url, video_url: a URL or {"url": ...}
        return LOOPBACK if "Simple" in cls_name or cls_name == "ResponseInputImageParam" else {"url": LOOPBACK}
    return {
        "input_audio": {"data": "UklGRg==", "format": "wav"}, "image_embeds": "AAAA", "audio_embeds": "AAAA",
        "video_embeds": "AAAA", "image_pil": "AAAA", "data": "AAAA", "file": {"file_data": "AAAA"},
        "text": "hi", "refusal": "no", "thinking": "hm", "name": "tool", "closed": True,
        "uuid": "u1", "prompt_cache_breakpoint": None,
    }.get(key, "x")  # fmt: skip


# Keys of vLLM's content-part TypedDicts that carry no media; every other key does. Derived
# here from the types, independently of the guard's own table (which comes from vLLM's
# parser map), so a media kind the guard misses still gets a case, and fails.
NOT_MEDIA_KEYS = {"type", "uuid", "text", "refusal", "thinking", "closed", "name", "prompt_cache_breakpoint", "data"}


def media_keys_of_the_types() -> set[str]:
    keys = set()
    for cls in vllm_content_part_types():
        keys |= (cls.__required_keys__ | cls.__optional_keys__) - NOT_MEDIA_KEYS
        kind = literal_type(cls)
        if kind and kind not in {"text", "refusal", "thinking", "tool_reference"}:
            keys.add(kind)
    return keys


def test_the_guards_media_keys_cover_every_media_key_of_vllms_types():
    assert media_keys_of_the_types() <= set(guard_module().media_part_keys())


def part_variants():
    """Each vLLM content-part type as a typed part, without its type, and with a uuid (which
    sends even a typed part down vLLM's key-based path, and is refused whatever it carries)."""
    media = media_keys_of_the_types()
    for cls in vllm_content_part_types():
        keys = cls.__required_keys__ | cls.__optional_keys__
        kind = literal_type(cls)
        part = {k: sample_value(k, cls.__name__) for k in sorted(keys - {"type", "uuid", "prompt_cache_breakpoint"})}

        def expected(carried):
            return Outcome.REJECTED_IMAGE_URL if carried <= {"image_url", "input_image"} else Outcome.REJECTED_UNSUPPORTED_MEDIA

        by_type = (keys & media) | ({kind} & media)
        if kind and by_type:
            yield f"{cls.__name__}-typed", {"type": kind, **part}, expected(by_type)
        by_keys = set(part) & media  # what vLLM's key-based path sees
        if by_keys:
            yield f"{cls.__name__}-typeless", part, expected(by_keys)
            yield f"{cls.__name__}-uuid", {"type": "text", "uuid": "u1", **part}, Outcome.REJECTED_UNSUPPORTED_MEDIA


def guard_module():
    import serving.admission.guard as module

    return module


PARTS = list(part_variants())


def test_the_derived_media_parts_cover_every_kind_vllm_fetches_or_decodes():
    names = {name.rsplit("-", 1)[0] for name, _, _ in PARTS}
    for expected in ("ChatCompletionContentPartImageParam", "CustomChatCompletionContentSimpleImageParam",
                     "ChatCompletionContentPartAudioParam", "ChatCompletionContentPartInputAudioParam",
                     "ChatCompletionContentPartVideoParam", "ChatCompletionContentPartImageEmbedsParam",
                     "CustomChatCompletionContentPILImageParam", "ChatCompletionContentPartPromptEmbedsParam",
                     "File"):  # fmt: skip
        assert expected in names, names
    assert len(PARTS) >= 30


@pytest.mark.parametrize("name, part, expected", PARTS, ids=[p[0] for p in PARTS])
def test_every_media_part_shape_is_checked_whatever_its_type(name, part, expected):
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    assert outcome_of(lambda: RequestGuard().check_images(body)) is expected


def test_typeless_image_parts_get_the_pixel_check():
    bomb = data_url(png_header_only(100_000, 100_000))
    for part in ({"image_url": bomb}, {"image_url": {"url": bomb}}, {"type": "input_image", "image_url": bomb},
                 {"type": "image_url", "image_url": {"url": bomb}, "uuid": None}):  # fmt: skip
        body = {"messages": [{"role": "user", "content": [part]}]}
        assert outcome_of(lambda b=body: RequestGuard().check_images(b)) is Outcome.REJECTED_IMAGE_TOO_LARGE, part


def test_vllm_takes_a_parts_uuid_as_the_images_identity():
    """Why the guard refuses uuids (vLLM 0.32's own code): a uuid with no image is still an
    image part to its parser, and two different images under one uuid get one cache identity
    (its processor, encoder and prefix caches are keyed by it)."""
    from vllm.multimodal.parse import MultiModalDataParser
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.renderers.chat_utils import _parse_chat_message_content_mm_part

    assert _parse_chat_message_content_mm_part({"type": "image_url", "image_url": None, "uuid": "scan-1"}) == (
        "image_url", None)  # fmt: skip
    parser = MultiModalDataParser()

    def identity(color: str, uuids: dict) -> str:
        items = parser.parse_mm_data({"image": [Image.new("RGB", (8, 8), color)]})
        return ProcessorInputs([1], items, uuids).get_mm_hashes("m", "blake3")["image"][0]

    assert identity("red", {"image": ["scan-1"]}) == identity("blue", {"image": ["scan-1"]}) == "scan-1"
    assert identity("red", {}) != identity("blue", {})  # without one: the content's hash


def test_a_media_part_with_a_uuid_is_refused_before_anything_is_read(monkeypatch):
    """vLLM takes a part's uuid as its cache identity, and a uuid with no data as a reference
    to what is cached under it: a client-chosen id could fetch another request's image."""
    read = []
    monkeypatch.setattr(guard_module(), "_declared_size", lambda *args: read.append(1) or (1, 1))
    tiny = data_url(image_bytes(1, 1))
    for part in ({"type": "image_url", "image_url": {"url": tiny}, "uuid": "scan-1"},
                 {"type": "image_url", "image_url": None, "uuid": "scan-1"}, {"type": "image_url", "uuid": "scan-1"},
                 {"image_url": tiny, "uuid": 7}, {"type": "input_image", "image_url": tiny, "uuid": ""}):  # fmt: skip
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
        error = error_of(lambda b=body: RequestGuard().check_images(b))
        assert error.outcome is Outcome.REJECTED_UNSUPPORTED_MEDIA and "uuid" in error.message, part
    assert read == []
    plain = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": tiny}, "uuid": None},
                                                       {"type": "text", "text": "hi", "uuid": "t"}]}]}  # fmt: skip
    assert run(RequestGuard().check_images(plain)) == (1, 1)  # a null uuid, a text part's: no cache identity


def test_too_many_images_are_refused_before_any_is_decoded(monkeypatch):
    decoded = []
    monkeypatch.setattr(guard_module(), "_declared_size", lambda *args: decoded.append(1) or (1, 1))
    tiny = data_url(image_bytes(1, 1))
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": tiny}}] * 2000}]}
    assert outcome_of(lambda: RequestGuard(GuardSettings(max_images=4)).check_images(body)) is Outcome.REJECTED_TOO_MANY_IMAGES
    assert decoded == []
    four = {"messages": [{"role": "user", "content": [{"image_url": tiny}] * 4}]}
    run(RequestGuard(GuardSettings(max_images=4)).check_images(four))
    assert len(decoded) == 4
