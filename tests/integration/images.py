"""Test images as data URLs: deterministic, of several sizes and formats."""

import base64
import io

import numpy as np
import numpy.random  # noqa: F401 - now: numpy 2's lazy import of it is not thread-safe (RecursionError)
from PIL import Image


def image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)).astype(np.uint8)
    noise = rng.integers(0, 40, size=(height, width), dtype=np.uint8)
    gray = np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(gray, mode="L")
    return img.convert(mode)


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    mime = "jpeg" if fmt.upper() in {"JPEG", "JPG"} else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}
