"""Gemma 3's image processor with transformers' PIL result and less work.

Guarantee: for what vLLM asks of it (RGB or greyscale PIL images, no pan-and-scan)
``ExactImageProcessor``'s pixel values are bit-identical to ``Gemma3ImageProcessorPil``'s.
Anything else goes to the reference unchanged (greyscale images made RGB first, as vLLM's
own decoder would have). The ``fast`` mode's savings beyond this are in its decoder
(``serving.images.decode``).

The reference turns the PIL image into a float-free numpy array, transposes it, turns it
back into a PIL image to resize it, back into numpy, then rescales in float64 and
normalises in float32 (about 40 ms for a 2048x2048 image here). This one resizes the PIL
image once, as the reference does (``Image.resize`` with the same size and filter), and
maps the uint8 result through a 256-entry table that the reference's own ``rescale`` and
``normalize`` computed: the same float32 values, without the float work per pixel.
A greyscale image, or an RGB one whose channels are all equal (vLLM's parser makes every
image RGB), is resized as one band and its table values copied to three channels: the
reference's RGB conversion copies the band, and PIL resizes each band alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from serving.images.decode import GREY_SOURCE

# What Gemma3Processor passes on every call (vLLM's defaults): the fast path takes these
# at these values; any other argument, or another value, goes to the reference.
PASSED_THROUGH = {"return_tensors"}
IGNORED_WITHOUT_PAN_AND_SCAN = {"pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                                "pan_and_scan_min_ratio_to_activate"}  # fmt: skip
FAST_MODES = {"RGB", "L"}


class ExactImageProcessor(Gemma3ImageProcessorPil):
    """``Gemma3ImageProcessorPil`` with a uint8 path for plain RGB and greyscale images."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._table: np.ndarray | None = None

    def preprocess(self, images, **kwargs: Any) -> BatchFeature:
        flat = flat_images(images)  # Gemma3Processor passes one list of images per prompt
        if flat is None or not self._fast_path_applies(flat, kwargs):
            return super().preprocess(as_rgb(images), **kwargs)
        side = (self.size.width, self.size.height)
        table = self.normalisation_table()
        pixels = np.empty((len(flat), 3, side[1], side[0]), dtype=table.dtype)
        for index, image in enumerate(flat):
            image = grey_band(image) or image  # a radiograph vLLM made RGB: resize one band
            resized = np.asarray(image.resize(side, resample=self.resample))
            if resized.ndim == 2:  # greyscale: one band, three identical channels
                np.take(table, resized, out=pixels[index, 0])
                pixels[index, 1:] = pixels[index, 0]
            else:  # a gather per channel, straight into place (no transposed copy)
                for channel in range(3):
                    np.take(table, resized[:, :, channel], out=pixels[index, channel])
        return BatchFeature(data={"pixel_values": pixels, "num_crops": [0] * len(flat)},
                            tensor_type=kwargs.get("return_tensors"))  # fmt: skip

    def normalisation_table(self) -> np.ndarray:
        """float32 value of each uint8 level after the reference's rescale and normalise."""
        if self._table is None:
            levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 256).repeat(3, axis=0)  # (C, H, W)
            values = self.rescale(levels, scale=self.rescale_factor)
            values = self.normalize(values, mean=self.image_mean, std=self.image_std)
            if not all(np.array_equal(values[0], values[c]) for c in (1, 2)):
                raise ValueError("per-channel normalisation differs by channel: not one table")
            self._table = np.ascontiguousarray(values[0, 0])
        return self._table

    def _fast_path_applies(self, images: list[Image.Image], kwargs: dict[str, Any]) -> bool:
        def setting(name: str):  # as the reference reads it: the call's value, else its own
            value = kwargs.get(name)
            return getattr(self, name, None) if value is None else value

        if not (setting("do_resize") and setting("do_rescale") and setting("do_normalize")):
            return False
        if setting("do_pan_and_scan") or setting("do_convert_rgb") is False:
            return False
        size = self.size  # a fixed height and width, the reference's only other sizes scale
        if not (getattr(size, "height", None) and getattr(size, "width", None)) or size.shortest_edge \
                or size.longest_edge or size.max_height:  # fmt: skip
            return False
        known = PASSED_THROUGH | IGNORED_WITHOUT_PAN_AND_SCAN | {"do_pan_and_scan", "do_convert_rgb", "do_resize",
                                                                 "do_rescale", "do_normalize"}  # fmt: skip
        if any(value is not None for key, value in kwargs.items() if key not in known):
            return False
        return bool(images) and all(image.mode in FAST_MODES for image in images)


def grey_band(image: Image.Image) -> Image.Image | None:
    """The one band of an RGB image whose three channels are equal everywhere (a greyscale
    picture, which vLLM's parser always converts to RGB), else None. One the project's
    decoder made from a greyscale image is taken at its word (``GREY_SOURCE``); others are
    compared, a sparse sample first, so a colour image costs almost nothing."""
    if image.mode != "RGB":
        return None
    if image.info.get(GREY_SOURCE):
        return image.getchannel(0)
    pixels = np.asarray(image)
    for view in (pixels[::53, ::59], pixels):
        if not (np.array_equal(view[..., 0], view[..., 1]) and np.array_equal(view[..., 0], view[..., 2])):
            return None
    return image.getchannel(0)


def flat_images(images) -> list[Image.Image] | None:
    """PIL images in order from a list, or a list of lists (one per prompt); else None."""
    if isinstance(images, Image.Image):
        return [images]
    if not isinstance(images, (list, tuple)):
        return None
    flat: list[Image.Image] = []
    for item in images:
        if isinstance(item, Image.Image):
            flat.append(item)
        elif isinstance(item, (list, tuple)) and all(isinstance(i, Image.Image) for i in item):
            flat.extend(item)
        else:
            return None
    return flat


def as_rgb(images):
    """``images`` with greyscale PIL images made RGB, as vLLM's decoder hands them to the
    reference (a caller may pass greyscale, which the fast path takes as one band)."""
    if isinstance(images, Image.Image):
        return images.convert("RGB") if images.mode == "L" else images
    if isinstance(images, (list, tuple)):
        return [as_rgb(item) for item in images]
    return images

