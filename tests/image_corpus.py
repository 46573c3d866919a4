"""Synthetic medical-like images for the image preprocessing tests and benchmark.

Deterministic (seeded) stand-ins for what the API receives: greyscale radiographs (smooth
anatomy-like shading, rib-like bands, a collimator edge, sensor noise), dermoscopy photos
(skin tone, a pigmented lesion with texture and hair-like strokes) and H&E pathology
tiles (pink stroma, purple nuclei, sharp edges). No real patient data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


def radiograph(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    body = 150 * np.exp(-(((u - 0.5) / 0.32) ** 2 + ((v - 0.55) / 0.45) ** 2))
    ribs = 25 * (np.sin(v * 60 + 6 * np.sin(u * 6)) > 0.6) * (np.abs(u - 0.5) > 0.08)
    spine = 60 * np.exp(-(((u - 0.5) / 0.03) ** 2))
    value = 20 + body + ribs * (body > 60) + spine + rng.normal(0, 3, (height, width))
    value[:, : width // 40] = 5  # collimator edge
    return Image.fromarray(value.clip(0, 255).astype(np.uint8), "L")


def dermoscopy(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width - 0.5, y / height - 0.5
    r = np.sqrt(u**2 + v**2) + 0.03 * np.sin(np.arctan2(v, u) * 7)
    lesion = (r < 0.25).astype(np.float32) * (0.6 + 0.4 * np.sin(x / 9) * np.cos(y / 7))
    skin = np.stack([np.full_like(u, 215), np.full_like(u, 165), np.full_like(u, 140)], -1)
    brown = np.array([95, 60, 40], np.float32)
    image = skin * (1 - lesion[..., None]) + brown * lesion[..., None] + rng.normal(0, 4, (height, width, 3))
    for _ in range(6):  # hairs
        x0, y0, angle = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0, np.pi)
        distance = np.abs((x - x0) * np.sin(angle) - (y - y0) * np.cos(angle))
        image[distance < max(1.0, width / 900)] = (40, 30, 25)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8), "RGB")


def pathology(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.float32)
    image[:] = (235, 170, 200)  # eosin stroma
    image += rng.normal(0, 10, (height, width, 3))
    y, x = np.mgrid[0:height, 0:width]
    scale = width / 512
    for _ in range(int(60 * scale)):  # haematoxylin nuclei, sharp-edged
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, 10) * scale
        x0, x1 = int(max(cx - radius, 0)), int(min(cx + radius + 1, width))
        y0, y1 = int(max(cy - radius, 0)), int(min(cy + radius + 1, height))
        inside = (x[y0:y1, x0:x1] - cx) ** 2 + (y[y0:y1, x0:x1] - cy) ** 2 < radius**2
        image[y0:y1, x0:x1][inside] = (90, 50, 140)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8), "RGB")


KINDS = {"radiograph": radiograph, "dermoscopy": dermoscopy, "pathology": pathology}


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes  # the encoded file, as a client sends it
    mime: str


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def sample(kind: str, width: int, height: int, fmt: str, mode: str | None = None, seed: int = 0,
           image: Image.Image | None = None, **options) -> Sample:  # fmt: skip
    image = image or KINDS[kind](width, height, seed)
    if mode:
        image = image.convert(mode)
    if fmt == "JPEG":
        options.setdefault("quality", 90)
    if fmt == "PNG":
        options.setdefault("compress_level", 1)  # fast to make; decoding costs about the same
    tag = "-trns" if "transparency" in options else ""
    return Sample(f"{kind}-{width}x{height}-{image.mode}{tag}.{fmt.lower()}", encode(image, fmt, **options),
                  f"image/{fmt.lower()}")  # fmt: skip


def corpus() -> list[Sample]:
    """The fidelity corpus: each kind at sizes below, at and far above the model's 896 px,
    square and not, as JPEG and PNG, plus the modes and encodings clients send."""
    samples = []
    for kind in KINDS:
        for width, height in [(512, 512), (896, 896), (1400, 1100), (2048, 2048), (3000, 2400), (1000, 3000)]:
            image = KINDS[kind](width, height)
            samples += [sample(kind, width, height, fmt, image=image) for fmt in ("JPEG", "PNG")]
    samples += [
        sample("radiograph", 2048, 2048, "JPEG", mode="RGB"),  # a greyscale film saved as RGB
        sample("radiograph", 2500, 2000, "JPEG", progressive=True),
        sample("radiograph", 2048, 1792, "PNG", mode="I;16"),  # 16-bit greyscale
        sample("dermoscopy", 2000, 1800, "PNG", mode="RGBA"),
        sample("pathology", 1800, 1800, "PNG", mode="P"),
        sample("pathology", 2000, 2000, "WEBP", quality=90),
        sample("dermoscopy", 4000, 600, "JPEG"),  # panoramic: one side below 896
        sample("radiograph", 64, 64, "PNG"),
        sample("radiograph", 2400, 1000, "JPEG"),  # one side at least 1792, the other not
        sample("dermoscopy", 2048, 2048, "JPEG", mode="CMYK"),
        sample("radiograph", 1200, 1000, "PNG", transparency=0),  # greyscale with a transparency key
        sample("radiograph", 1200, 1000, "PNG", mode="LA"),
        rotated_jpeg(dermoscopy(2400, 1900, seed=3), "dermoscopy-2400x1900-exif6.jpeg"),
        rotated_jpeg(radiograph(2000, 1800, seed=4), "radiograph-2000x1800-L-exif8.jpeg", orientation=8),
    ]
    assert len(samples) == CORPUS_SIZE
    return samples


CORPUS_SIZE = 50  # the tests are parametrised by index without building the corpus


def rotated_jpeg(image: Image.Image, name: str, orientation: int = 6) -> Sample:
    """A JPEG whose EXIF orientation (6: rotate 90, 8: rotate 270) must be applied before resizing."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return Sample(name, encode(image, "JPEG", quality=90, exif=exif), "image/jpeg")
