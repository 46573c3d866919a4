"""Image decoding for MedGemma: no more pixels than the model's 896x896 input can use.

Guarantee: the image handed on is what vLLM's ``ImageMediaIO`` hands on (same size checks,
EXIF orientation, mode conversion and errors), except that
 - a JPEG at least twice ``MODEL_SIDE`` on both sides is decoded with Pillow's DCT
   scaling (``Image.draft``) at the smallest of 1/2, 1/4, 1/8 of its size that keeps both
   sides at least ``MODEL_SIDE``;
 - then a side of at least 3 x ``MODEL_SIDE`` is box-reduced by an integer factor that
   keeps it at least 1.5 x ``MODEL_SIDE`` (``reduce_for_model``).
The processor resizes every image to 896x896 anyway, so no side ever goes below what the
model sees. Both change pixel values slightly (the bound is measured in
tests/unit/images/test_fidelity.py and stated in docs/images.md). Everything vLLM does to
the image afterwards (its parser's second EXIF pass and RGB conversion, each a full copy;
the resize) then works on a fraction of the pixels. An image without EXIF orientation is
not copied to apply none (vLLM's ``normalize_image`` copies it), and an RGB image made
from a greyscale one says so (``GREY_SOURCE``).

vLLM looks its media connector up by name (``VLLM_MEDIA_CONNECTOR``) in
``MEDIA_CONNECTOR_REGISTRY``; ``register`` adds ours there, in every vLLM process, from the
project's ``vllm.general_plugins`` entry point (``serving.compat``). The processor cache
key is the image's bytes plus ``io_config``, which names this decoder, so results of the
two decoders are never mixed up.
"""

from __future__ import annotations

import logging
from io import BytesIO

from PIL import Image

logger = logging.getLogger(__name__)

CONNECTOR_NAME = "medgemma"
MODEL_SIDE = 896  # Gemma 3's SigLIP input: every image becomes 896x896
DECODER = "medgemma-v1"  # part of the processor cache key; change it when the pixels change
REDUCING_GAP = 1.5  # a side is box-reduced by int(side / (896 * 1.5)): it stays at least 1344
REDUCIBLE_MODES = ("L", "RGB")
# In the ``info`` of an RGB image this decoder made from one band (a radiograph): its three
# channels are equal by construction, so the processor resizes one band without comparing
# them (``serving.images.processor.grey_band``). PIL's copies keep ``info``, and vLLM's
# parser only copies, transposes (EXIF) and converts RGB to RGB (a no-op) after us.
GREY_SOURCE = "medgemma_grey_source"
_first_reduced = True  # the first reduced decode in a process is logged (no content: a scale)


def decode_reduced(image: Image.Image, side: int = MODEL_SIDE) -> int:
    """Ask Pillow to decode a JPEG at a reduced scale (before anything loads it); returns
    the scale denominator (1: full size, or not a JPEG). Pillow picks the largest of 8, 4,
    2, 1 not above ``min(width // side, height // side)`` and rounds the scaled sides up, so
    both stay at least ``side``."""
    if image.format != "JPEG" or min(image.size) < 2 * side:
        return 1
    image.draft(image.mode, (side, side))
    return image.decoderconfig[0] if image.decoderconfig else 1


def orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag (None when there is none or it cannot be read)."""
    try:
        return image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - vLLM's normalize_image ignores unreadable EXIF too
        return None


def reduce_for_model(image: Image.Image, side: int = MODEL_SIDE, gap: float = REDUCING_GAP) -> Image.Image:
    """``image`` box-reduced by an integer factor per axis (Pillow's ``Image.reduce``, the
    first step of its ``reducing_gap`` resize) so each side stays at least ``gap * side``;
    the image itself when no side is that large, or its mode is not L or RGB."""
    factors = (int(image.width / (side * gap)) or 1, int(image.height / (side * gap)) or 1)
    if factors == (1, 1) or image.mode not in REDUCIBLE_MODES:
        return image
    return image.reduce(factors)


def announce_reduced(scale: int) -> None:
    global _first_reduced
    if _first_reduced:
        _first_reduced = False
        logger.info("image preprocessing: first JPEG decoded at 1/%d scale (serving.images.decode)", scale)


def media_classes():
    """``(ImageMediaIO subclass, MediaConnector subclass)``, defined on first use so that
    importing this module does not import vLLM."""
    import vllm.envs as envs
    from vllm.multimodal.image import normalize_image, open_image
    from vllm.multimodal.media import MediaConnector
    from vllm.multimodal.media.base import MediaWithBytes
    from vllm.multimodal.media.image import ImageMediaIO

    class MedGemmaImageMediaIO(ImageMediaIO):
        """``ImageMediaIO.load_bytes`` with the changes above; the rest is its code."""

        def load_bytes(self, data: bytes) -> MediaWithBytes[Image.Image]:
            try:
                image = open_image(BytesIO(data))
                w, h = image.size
                max_pixels = envs.VLLM_MAX_IMAGE_PIXELS
                if max_pixels > 0 and w * h > max_pixels:
                    raise ValueError(
                        f"Image dimensions {w}x{h} ({w * h} pixels) exceed the maximum of "
                        f"{max_pixels} pixels. Set VLLM_MAX_IMAGE_PIXELS to increase this limit."
                    )
                scale = decode_reduced(image)
                if scale > 1:
                    announce_reduced(scale)
                if orientation(image) not in (None, 1):  # else vLLM's normalize_image only copies
                    image = normalize_image(image)
                image.load()
                if image.mode not in REDUCIBLE_MODES:  # palette, alpha, 16-bit, CMYK: as vLLM
                    image = self._convert_image_mode(image)
                converted = self._convert_image_mode(reduce_for_model(image))
                if image.mode == "L" and converted.mode == "RGB" and "transparency" not in image.info:
                    converted.info[GREY_SOURCE] = True  # (a transparent key is filled with a colour)
            except (OSError, Image.UnidentifiedImageError) as e:
                raise ValueError(f"Failed to load image: {e}") from e
            io_config = {"decoder": DECODER, "image_mode": self.image_mode,
                         "rgba_background_color": self.rgba_background_color}  # fmt: skip
            return MediaWithBytes(converted, data, io_config)

    class MedGemmaMediaConnector(MediaConnector):
        """vLLM's connector, loading images with ``MedGemmaImageMediaIO``."""

        def _image_io(self, image_mode: str | None) -> MedGemmaImageMediaIO:
            return MedGemmaImageMediaIO(**({"image_mode": image_mode} | self.media_io_kwargs.get("image", {})))

        def fetch_image(self, image_url: str, *, image_mode: str | None = "RGB") -> Image.Image:
            return self._fetch(image_url, image_mode)

        async def fetch_image_async(self, image_url: str, *, image_mode: str | None = "RGB") -> Image.Image:
            return await self._fetch_async(image_url, image_mode)

        def _fetch(self, image_url, image_mode):
            try:
                return self.load_from_url(image_url, self._image_io(image_mode),
                                          fetch_timeout=envs.VLLM_IMAGE_FETCH_TIMEOUT)  # fmt: skip
            except Image.UnidentifiedImageError as e:  # as vLLM's: a ValueError upstream
                raise ValueError(str(e)) from e

        async def _fetch_async(self, image_url, image_mode):
            try:
                return await self.load_from_url_async(image_url, self._image_io(image_mode),
                                                      fetch_timeout=envs.VLLM_IMAGE_FETCH_TIMEOUT)  # fmt: skip
            except Image.UnidentifiedImageError as e:
                raise ValueError(str(e)) from e

    return MedGemmaImageMediaIO, MedGemmaMediaConnector


def register() -> None:
    """Add ``MedGemmaMediaConnector`` to vLLM's registry as ``CONNECTOR_NAME`` (idempotent)."""
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY

    _, connector = media_classes()
    if CONNECTOR_NAME not in getattr(MEDIA_CONNECTOR_REGISTRY, "name2class", {}):
        MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)(connector)
