"""Synthetic images that look like medical images, not noise or blank frames.

Two kinds, drawn per image:
- ``radiograph``: a grayscale chest-film-like picture - dark air, a soft-tissue torso with
  two darker lung fields, a bright spine, rib arcs, clavicles, a heart shadow, film mottle.
- ``dermoscopy``: a colour skin patch with an irregular pigmented lesion (colour
  variegation, a pigment network), a few hairs, inside a dermatoscope's round field.

Guarantees: deterministic per seed; ``ImageSource`` hands out encoded images in
``repeated`` mode (a fixed pool: the same bytes again, which vLLM's multimodal cache can
serve) or ``unique`` mode (every image differs: a per-image stamp over a pooled base, so no
cache can hit and generation stays cheap).
"""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from loadtests.distributions import Distribution

KINDS = ("radiograph", "dermoscopy")
FORMATS = ("jpeg", "png")


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a small random grid upsampled bicubically."""
    grid = rng.random((cells, max(2, cells * width // max(height, 1)))).astype(np.float32)
    image = Image.fromarray((grid * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255.0


def radiograph(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width - 0.5, y / height - 0.5  # centred coordinates
    torso = np.clip(1.2 - (u / 0.42) ** 2 - (v / 0.62) ** 4, 0, 1) ** 0.5
    image = 0.08 + 0.5 * torso
    tilt = rng.uniform(-0.03, 0.03)
    for side in (-1, 1):  # lung fields
        cx, cy = side * rng.uniform(0.17, 0.21) + tilt, rng.uniform(-0.05, 0.0)
        lung = np.clip(1 - ((u - cx) / 0.14) ** 2 - ((v - cy) / 0.3) ** 2, 0, 1) ** 0.6
        image -= 0.32 * lung
    vessels = _smooth_noise(rng, height, width, 24)
    image += 0.06 * (vessels - 0.5) * (image < 0.35)
    spine = np.exp(-(((u - tilt) / 0.035) ** 2)) * (v > -0.45)
    image += 0.32 * spine
    for k in range(9):  # ribs: bright arcs, a pair per level
        level = -0.33 + k * 0.075
        for side in (-1, 1):
            arc = level + 0.25 * (u * side + 0.02) ** 2 * 2.2 - 0.05 * abs(u)
            rib = np.exp(-(((v - arc) / 0.009) ** 2)) * (np.abs(u) < 0.36) * (np.abs(u) > 0.04)
            image += 0.13 * rib * (side * u > 0)
    for side in (-1, 1):  # clavicles
        line = -0.36 + 0.18 * (side * u) ** 1.0
        image += 0.18 * np.exp(-(((v - line) / 0.012) ** 2)) * (np.abs(u) < 0.25) * (side * u > 0.02)
    heart = np.clip(1 - ((u - 0.06 - tilt) / 0.16) ** 2 - ((v - 0.16) / 0.15) ** 2, 0, 1) ** 0.7
    image += 0.28 * heart
    image += rng.normal(0, 0.025, image.shape).astype(np.float32)  # film mottle
    image *= 1 - 0.35 * (u**2 + v**2)  # vignetting
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8), mode="L")


SKIN_TONES = [(233, 190, 160), (214, 166, 128), (190, 140, 104), (150, 104, 72), (224, 178, 150)]


def dermoscopy(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (x - width / 2) / min(width, height), (y - height / 2) / min(width, height)
    skin = np.array(SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], dtype=np.float32) / 255
    texture = _smooth_noise(rng, height, width, 40)[..., None]
    image = skin[None, None, :] * (0.92 + 0.12 * texture)
    angle, radius = np.arctan2(v, u), np.hypot(u, v)
    edge = 0.22 + sum(  # an irregular border: a few random harmonics
        rng.uniform(0.005, 0.03) * np.sin(k * angle + rng.uniform(0, 6.3)) for k in range(2, 7)
    )
    inside = np.clip((edge - radius) / 0.02, 0, 1)[..., None]
    brown = np.array([0.45, 0.28, 0.17], dtype=np.float32)
    dark = np.array([0.22, 0.12, 0.08], dtype=np.float32)
    blue_grey = np.array([0.42, 0.45, 0.55], dtype=np.float32)
    variegation = _smooth_noise(rng, height, width, 8)[..., None]
    lesion = brown + (dark - brown) * variegation
    veil = np.clip((_smooth_noise(rng, height, width, 5) - 0.7) * 4, 0, 1)[..., None]
    lesion = lesion * (1 - 0.6 * veil) + blue_grey * 0.6 * veil
    period = rng.uniform(0.018, 0.03)
    network = (np.sin(u / period * 6.28) * np.sin(v / period * 6.28) > 0.55)[..., None]
    lesion = lesion * (1 - 0.25 * network)
    image = image * (1 - inside) + lesion * inside
    for _ in range(int(rng.integers(2, 7))):  # hairs: dark, gently curved
        a, b, c = rng.uniform(-0.6, 0.6), rng.uniform(-1.5, 1.5), rng.uniform(-0.8, 0.8)
        curve = a + b * u + c * u**2
        hair = np.exp(-(((v - curve) / 0.003) ** 2))[..., None]
        image = image * (1 - 0.7 * hair)
    image += rng.normal(0, 0.012, image.shape).astype(np.float32)
    field = np.clip((0.55 - radius) / 0.03, 0, 1)[..., None]  # the dermatoscope's round field
    image *= field
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8), mode="RGB")


def generate(kind: str, seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return radiograph(rng, width, height) if kind == "radiograph" else dermoscopy(rng, width, height)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=88)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    mime: str
    kind: str
    width: int
    height: int


class ImageSource:
    """Encoded images for requests, in ``repeated`` or ``unique`` mode."""

    def __init__(
        self,
        *,
        mode: str = "unique",
        pool_size: int = 8,
        size: Distribution,
        formats: tuple[str, ...] = ("jpeg",),
        kinds: tuple[str, ...] = KINDS,
        seed: int = 0,
    ):
        if mode not in ("unique", "repeated"):
            raise ValueError("image mode must be unique or repeated")
        self.mode = mode
        self.rng = random.Random(seed)
        self.formats = formats
        self._bases: list[tuple[str, Image.Image]] = []
        for i in range(max(1, pool_size)):
            kind = kinds[i % len(kinds)]
            side = max(32, size.sample(self.rng))
            height = side if kind == "radiograph" else max(32, side * 3 // 4)
            self._bases.append((kind, generate(kind, seed * 1000 + i, side, height)))
        self._encoded: dict[tuple[int, str], EncodedImage] = {}
        self._stamps = itertools.count(1)

    def next(self) -> EncodedImage:
        index = self.rng.randrange(len(self._bases))
        fmt = self.rng.choice(self.formats)
        kind, base = self._bases[index]
        if self.mode == "repeated":
            key = (index, fmt)
            if key not in self._encoded:
                self._encoded[key] = self._encode(kind, base, fmt)
            return self._encoded[key]
        return self._encode(kind, self._stamped(base, next(self._stamps)), fmt)

    def _stamped(self, base: Image.Image, stamp: int) -> Image.Image:
        """The base with a faint unique texture: pixels (and so every hash) differ."""
        pixels = np.array(base, dtype=np.int16)
        noise = np.random.default_rng(stamp).integers(-6, 7, pixels.shape, dtype=np.int16)
        return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), mode=base.mode)

    @staticmethod
    def _encode(kind: str, image: Image.Image, fmt: str) -> EncodedImage:
        return EncodedImage(encode(image, fmt), f"image/{fmt}", kind, image.width, image.height)
