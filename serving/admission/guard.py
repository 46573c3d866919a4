"""Checks on a model request's raw body, before admission and before vLLM sees it.

Guarantees (each refusal is an ``AdmissionError`` whose outcome maps to HTTP in ``outcomes``):
- A body larger than ``max_body_bytes`` is refused with 413 ``request_too_large`` - from its
  Content-Length before reading, or as soon as the bytes read pass the limit.
- A body not fully received within ``body_timeout_s`` (a client trickling it) gets 408
  ``request_timeout``.
- A body that is not a JSON object (malformed, too deeply nested, an array) gets 400
  ``invalid_json``; vLLM never parses it.
- Media parts are found the way vLLM 0.32's chat parser finds them: by their ``type`` and
  by their keys, whatever the ``type`` says (vLLM reads ``{"image_url": ...}`` with no type,
  or with any type when a ``uuid`` is present, as an image). The keys come from vLLM's own
  parser table (``media_part_keys``). Only images are served: a part that carries audio,
  video, embeddings, a PIL image or a file is refused with 400 ``unsupported_media``.
- A media part with a ``uuid`` is refused (400 ``unsupported_media``). vLLM takes a part's
  uuid as the item's cache identity in place of its content hash, and a part with a uuid
  and no data as a reference to whatever is cached under it: on a shared server a
  client-chosen id would put another request's image - another patient's - into this one.
- More image parts than ``max_images`` are refused (400 ``too_many_images``) before any is
  decoded; the rest are checked one by one, each bounded (a 48 KiB header read).
- Image parts: a ``data:`` URL must say ``image/...``; its declared width x height (read
  from the image header without decoding pixels) must be at most ``max_image_pixels``
  (400 ``image_too_large``: decompression bombs never reach the decoder). Any other URL
  (``http(s)``, ``file:``) is refused with 400 ``image_url_not_allowed`` unless remote images
  are enabled for its host, and then only when the host resolves to public addresses (or
  private ones are explicitly allowed) - no request can make the server fetch from
  loopback, link-local (cloud metadata) or internal addresses by default.
- Nothing here logs request content.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import io
import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

from serving.admission.outcomes import AdmissionError, Outcome

# Part types and keys that carry an image by URL (vLLM: "image_url", and the Responses
# API's "input_image" whose "image_url" is a string).
IMAGE_PART_TYPES = frozenset({"image_url", "input_image"})
HUGE = (2**31, 2**31)  # what _declared_size reports for a header PIL refuses to open
HEADER_PREFIX_CHARS = 65536  # base64 characters decoded to read an image header (48 KiB)


@dataclass(frozen=True)
class GuardSettings:
    max_body_bytes: int = 20 * 2**20
    body_timeout_s: float = 30.0
    max_image_pixels: int = 50_000_000
    remote_image_hosts: frozenset[str] = frozenset()  # empty: remote image URLs are refused
    remote_image_private_networks: bool = False  # allow hosts resolving to private addresses
    max_images: int = 4  # image parts per request (vLLM's --limit-mm-per-prompt)


class RequestGuard:
    def __init__(self, settings: GuardSettings | None = None, resolve=None):
        self.settings = settings or GuardSettings()
        self._resolve = resolve or _resolve_addresses

    # --- body -------------------------------------------------------------------------

    async def read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None if the client left while sending it."""
        limit = self.settings.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise self._too_large()
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise self._too_large()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise AdmissionError(
                Outcome.REJECTED_BODY_TIMEOUT,
                f"The request body was not received within {self.settings.body_timeout_s:g}s.",
            ) from None

    def _too_large(self) -> AdmissionError:
        return AdmissionError(
            Outcome.REJECTED_BODY_TOO_LARGE,
            f"The request body is larger than {self.settings.max_body_bytes} bytes.",
        )

    @staticmethod
    def parse(body: bytes) -> dict:
        try:
            parsed = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError):
            raise AdmissionError(
                Outcome.REJECTED_INVALID_JSON, "The request body is not valid JSON."
            ) from None
        if not isinstance(parsed, dict):
            raise AdmissionError(
                Outcome.REJECTED_INVALID_JSON, "The request body must be a JSON object."
            )
        return parsed

    # --- images -----------------------------------------------------------------------

    async def check_images(self, body: dict) -> tuple[int, int]:
        """Refuse media we do not serve, too many images, then check each image's source.
        Returns the image count and the pixels of the inline images whose header was read."""
        images = []
        for part, kinds in media_parts(body):
            if part.get("uuid") is not None:
                raise AdmissionError(
                    Outcome.REJECTED_UNSUPPORTED_MEDIA,
                    "Content parts carrying media may not carry a uuid: here images are "
                    "identified by their content, never by an id a client chooses. Send the "
                    "image itself; a repeated image is recognised by its content.",
                )
            unsupported = kinds - IMAGE_PART_TYPES
            if unsupported:
                raise AdmissionError(
                    Outcome.REJECTED_UNSUPPORTED_MEDIA,
                    f"Content parts carrying {', '.join(sorted(unsupported))} are not accepted: "
                    "this model takes images only, as image_url parts (base64 data URLs).",
                )
            images.append(part)
        if len(images) > self.settings.max_images:
            raise AdmissionError(
                Outcome.REJECTED_TOO_MANY_IMAGES,
                f"At most {self.settings.max_images} images are allowed in one request; "
                f"this one has {len(images)}.",
            )
        pixels = 0
        for part in images:
            url = image_url(part)
            if url is None:
                continue  # no URL string: vLLM refuses the part (400) without fetching
            if url.startswith("data:"):
                pixels += self._check_data_url(url)
            else:
                await self._check_remote_url(url)
            await asyncio.sleep(0)  # each header read is bounded; others run between them
        return len(images), pixels

    def _check_data_url(self, url: str) -> int:
        """Its pixels (0 when its header cannot be read here)."""
        comma = url.find(",")  # not partition: that would copy a payload of megabytes
        header, payload_start = (url, len(url)) if comma < 0 else (url[:comma], comma + 1)
        if not header[5:].lower().startswith("image/"):
            raise AdmissionError(
                Outcome.REJECTED_INVALID_IMAGE,
                "An image data URL must have an image/* media type (data:image/png;base64,...).",
            )
        if not header.lower().endswith(";base64"):
            return 0  # vLLM decodes (or refuses) it
        size = _declared_size(url, payload_start)
        if size is None:
            return 0  # not a readable image header: vLLM refuses it with a 400
        width, height = size
        if width * height > self.settings.max_image_pixels:
            what = "An image" if size == HUGE else f"An image of {width}x{height} pixels"
            raise AdmissionError(
                Outcome.REJECTED_IMAGE_TOO_LARGE,
                f"{what} is larger than the {self.settings.max_image_pixels} pixels allowed.",
            )
        return width * height

    async def _check_remote_url(self, url: str) -> None:
        hosts = self.settings.remote_image_hosts
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
        except ValueError:
            parts, host = None, ""
        if not hosts or parts is None or parts.scheme not in ("http", "https") or host not in hosts:
            raise AdmissionError(
                Outcome.REJECTED_IMAGE_URL,
                "Image URLs are not allowed here; send the image inline as a base64 data URL."
                if not hosts
                else "Image URLs must be http(s) on an allowed host; send other images inline.",
            )
        if self.settings.remote_image_private_networks:
            return
        try:
            addresses = await self._resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
        except OSError:
            addresses = []
        if not addresses or any(not ipaddress.ip_address(a).is_global for a in addresses):
            raise AdmissionError(
                Outcome.REJECTED_IMAGE_URL,
                "The image host does not resolve to a public address.",
            )


def iter_content_parts(body: dict) -> Iterator[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    yield part


@functools.cache
def media_part_keys() -> frozenset[str]:
    """Part types and keys that make vLLM 0.32's chat parser treat a part as media: its
    parser table's entries less the text ones, plus OpenAI's ``file`` part."""
    from vllm.renderers.chat_utils import MM_PARSER_MAP, TEXT_PART_TYPES

    return frozenset(MM_PARSER_MAP) - TEXT_PART_TYPES - {"tool_reference"} | {"file"}


def media_parts(body: dict) -> Iterator[tuple[dict, frozenset[str]]]:
    """Each content part that carries media, with what it carries (its media keys, and its
    type when that is a media type): a part's type does not stop vLLM reading its keys."""
    media = media_part_keys()
    for part in iter_content_parts(body):
        kinds = {key for key in part if key in media}
        kind = part.get("type")
        if isinstance(kind, str) and kind in media:
            kinds.add(kind)
        if kinds:
            yield part, frozenset(kinds)


def image_url(part: dict) -> str | None:
    """The URL an image part makes vLLM load (``image_url`` as a string or ``{"url": ...}``)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    return url if isinstance(url, str) else None


def count_images(body: dict) -> int:
    return sum(1 for _, kinds in media_parts(body) if kinds & IMAGE_PART_TYPES)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _declared_size(url: str, start: int) -> tuple[int, int] | None:
    """Width and height from the header of the image whose base64 starts at ``url[start]``,
    decoding as little base64 as it needs."""
    from PIL import Image

    total = len(url) - start
    for chars in dict.fromkeys((min(total, HEADER_PREFIX_CHARS), total)):  # the prefix, then all of it
        try:
            data = binascii.a2b_base64(url[start : start + chars - chars % 4])
        except (binascii.Error, ValueError):
            return None
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.size
        except Image.DecompressionBombError:
            return HUGE  # more than twice PIL's own limit: PIL will not even open it
        except Exception:  # noqa: BLE001 - a truncated header or not an image at all
            continue
    return None


async def _resolve_addresses(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]
