"""The model gets the same pixels from ``serving.images`` as from vLLM alone (``exact``), or
pixels within a stated bound (``fast``): docs/images.md.

Reference: what vLLM 0.32 does for a chat request's image on this machine: its
``ImageMediaIO.load_bytes`` (decode, EXIF orientation, RGB) and transformers'
``Gemma3ImageProcessorPil`` with the arguments vLLM's Gemma3Processor passes. The corpus is
tests/image_corpus.py: synthetic radiograph-, dermoscopy- and pathology-like images of many
sizes, formats and modes. Differences are in normalised pixel units (the model's input:
-1..1, one 8-bit grey level is 2/255 = 0.0078).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from serving import compat
from serving.devmodel import preprocessor_config
from tests.image_corpus import Sample, corpus, encode

compat.register()  # the CPU environment's shim, so the reference processor imports

from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # noqa: E402
from vllm.multimodal.media.image import ImageMediaIO  # noqa: E402

from serving.images.decode import media_classes  # noqa: E402
from serving.images.processor import ExactImageProcessor, FastImageProcessor  # noqa: E402

LEVEL = 2 / 255  # one 8-bit level in normalised units
# The bound for ``fast`` (docs/images.md): per image, no pixel off by more than 32 levels
# (at sharp edges) and on average less than 1.5 levels. For scale: saving this corpus's PNG
# sources once more as quality-90 JPEGs moves pixels by up to 72 levels, 7.1 on average.
MAX_ABS = 32 * LEVEL
MEAN_ABS = 1.5 * LEVEL
# What Gemma3Processor passes to the image processor in vLLM 0.32 (captured from a call).
VLLM_KWARGS = {"do_convert_rgb": True, "do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256,
               "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2,
               "return_tensors": "pt"}  # fmt: skip


@functools.cache
def samples() -> list[Sample]:
    return corpus()


@functools.cache
def processors(model_dir: str):
    return tuple(cls.from_pretrained(model_dir) for cls in (Gemma3ImageProcessorPil, ExactImageProcessor, FastImageProcessor))


@pytest.fixture(scope="module")
def dev_model_dir(tmp_path_factory):
    """A folder with the model's image processor configuration (all a processor loads)."""
    folder = tmp_path_factory.mktemp("processor")
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config()))
    return folder


@pytest.fixture(scope="module")
def pipelines(dev_model_dir):
    reference, exact, fast = processors(str(dev_model_dir))
    fast_io, _ = media_classes()

    def run(io_class, processor, data: bytes) -> torch.Tensor:
        return processor(images=[io_class().load_bytes(data).media], **VLLM_KWARGS)["pixel_values"]

    return {
        "reference": lambda data: run(ImageMediaIO, reference, data),
        "exact": lambda data: run(ImageMediaIO, exact, data),  # exact mode keeps vLLM's decoder
        "fast": lambda data: run(fast_io, fast, data),
    }


@pytest.mark.parametrize("index", range(45))
def test_exact_preprocessing_is_bit_identical_to_vllms(pipelines, index):
    item = samples()[index]
    reference, exact = pipelines["reference"](item.data), pipelines["exact"](item.data)
    assert exact.dtype == reference.dtype and exact.shape == reference.shape == (1, 3, 896, 896), item.name
    assert torch.equal(exact, reference), f"{item.name}: {(exact - reference).abs().max()}"


def test_the_corpus_is_what_the_bound_was_measured_on():
    names = [s.name for s in samples()]
    assert len(names) == 45 and len(set(names)) == 45
    assert {n.split("-")[0] for n in names} == {"radiograph", "dermoscopy", "pathology"}
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpeg", "png", "webp"}


@pytest.mark.parametrize("index", range(45))
def test_fast_preprocessing_stays_within_the_stated_bound(pipelines, index):
    item = samples()[index]
    reference, fast = pipelines["reference"](item.data), pipelines["fast"](item.data)
    assert fast.dtype == reference.dtype and fast.shape == reference.shape, item.name
    diff = (fast - reference).abs()
    where = f"{item.name}: max {float(diff.max()):.4f} mean {float(diff.mean()):.5f}"
    assert float(diff.max()) <= MAX_ABS + 1e-6, where
    assert float(diff.mean()) <= MEAN_ABS, where
    MEASURED[item.name] = (float(diff.max()), float(diff.mean()))


MEASURED: dict[str, tuple[float, float]] = {}


def test_both_fall_back_to_the_reference_for_pan_and_scan(pipelines, dev_model_dir):
    reference, exact, fast = processors(str(dev_model_dir))
    item = next(s for s in samples() if s.name.startswith("dermoscopy-4000x600"))
    image = ImageMediaIO().load_bytes(item.data).media
    kwargs = VLLM_KWARGS | {"do_pan_and_scan": True}
    expected = reference(images=[image], **kwargs)
    assert int(expected["num_crops"][0]) > 0  # pan-and-scan did crop: the case is real
    for processor in (exact, fast):
        got = processor(images=[image], **kwargs)
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
        assert torch.equal(got["num_crops"], expected["num_crops"])


def test_the_normalisation_table_is_the_reference_arithmetic(dev_model_dir):
    reference, exact, _ = processors(str(dev_model_dir))
    levels = np.arange(256, dtype=np.uint8)
    expected = (levels.astype(np.float64) * reference.rescale_factor).astype(np.float32)
    expected = ((expected - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)
    assert np.array_equal(exact.normalisation_table(), expected)
