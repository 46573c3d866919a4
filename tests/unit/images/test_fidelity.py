"""The model gets the same pixels from ``serving.images`` as from vLLM with transformers' PIL
processor (``exact``), or pixels within a stated bound (``fast``): docs/images.md.

Reference: what vLLM 0.32 does for a chat request's image on this machine (no
torchvision): its ``ImageMediaIO.load_bytes`` (decode, EXIF orientation, RGB) and
transformers' ``Gemma3ImageProcessorPil``, called the way vLLM's Gemma3Processor calls it
(a list of images per prompt, these arguments). That vLLM really builds this project's
processors and takes their fast path is tests/unit/test_compat.py's part. The corpus is
tests/image_corpus.py: synthetic radiograph-, dermoscopy- and pathology-like images of many
sizes, formats and modes. Differences are in normalised pixel units (the model's input:
-1..1, one 8-bit grey level is 2/255 = 0.0078).
"""

from __future__ import annotations

import functools
import io
import json

import numpy as np
import pytest
import torch

from serving import compat
from serving.devmodel import preprocessor_config
from tests.image_corpus import CORPUS_SIZE, Sample, corpus

compat.register()  # the CPU environment's shim, so the reference processor imports

from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # noqa: E402
from vllm.multimodal.media.image import ImageMediaIO  # noqa: E402

from serving.images.decode import media_classes  # noqa: E402
from serving.images.processor import ExactImageProcessor  # noqa: E402

LEVEL = 2 / 255  # one 8-bit level in normalised units
# The bound for ``fast`` (docs/images.md): per image, no pixel off by more than 40 levels
# (at sharp edges) and on average less than 1.5 levels. For scale: saving this corpus's PNG
# sources once more as quality-90 JPEGs moves pixels by up to 72 levels, 7.1 on average.
MAX_ABS = 40 * LEVEL
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
    return Gemma3ImageProcessorPil.from_pretrained(model_dir), ExactImageProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def dev_model_dir(tmp_path_factory):
    """A folder with the model's image processor configuration (all a processor loads)."""
    folder = tmp_path_factory.mktemp("processor")
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config()))
    return folder


@pytest.fixture(scope="module")
def pipelines(dev_model_dir):
    reference, exact = processors(str(dev_model_dir))  # both modes use the exact processor
    fast_io, _ = media_classes()

    def run(io_class, processor, data: bytes) -> torch.Tensor:
        return processor(images=[[io_class().load_bytes(data).media]], **VLLM_KWARGS)["pixel_values"]

    return {
        "reference": lambda data: run(ImageMediaIO, reference, data),
        "exact": lambda data: run(ImageMediaIO, exact, data),  # exact mode keeps vLLM's decoder
        "fast": lambda data: run(fast_io, exact, data),  # fast mode: its own decoder
    }


@pytest.mark.parametrize("index", range(CORPUS_SIZE))
def test_exact_preprocessing_is_bit_identical_to_vllms(pipelines, index):
    item = samples()[index]
    reference, exact = pipelines["reference"](item.data), pipelines["exact"](item.data)
    assert exact.dtype == reference.dtype and exact.shape == reference.shape == (1, 3, 896, 896), item.name
    assert torch.equal(exact, reference), f"{item.name}: {(exact - reference).abs().max()}"


def test_the_corpus_is_what_the_bound_was_measured_on():
    names = [s.name for s in samples()]
    assert len(set(names)) == len(names) == CORPUS_SIZE
    assert {n.split("-")[0] for n in names} == {"radiograph", "dermoscopy", "pathology"}
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpeg", "png", "webp"}


@pytest.mark.parametrize("index", range(CORPUS_SIZE))
def test_the_decoder_gives_vllms_picture_unless_it_reduced_it_and_never_below_896(index):
    """Same size, orientation and pixels as vLLM's decoder for every image it did not reduce
    (greyscale compared as RGB); a reduced one is smaller on some side and never below 896
    (or its original side) on either. (Sides are reduced apart: the processor squashes
    every image to 896x896, so the aspect ratio is not kept downstream either; that the
    orientation and content survive is the pixel bound's part.)"""
    item = samples()[index]
    fast_io, _ = media_classes()
    ours, theirs = fast_io().load_bytes(item.data).media, ImageMediaIO().load_bytes(item.data).media
    assert ours.mode in ("RGB", "L") and theirs.mode == "RGB", item.name
    if ours.size != theirs.size:  # DCT-scaled or box-reduced
        assert max(theirs.size) >= 2 * 896, item.name
        for got, full in zip(ours.size, theirs.size):
            assert min(full, 896) <= got <= full, (item.name, ours.size, theirs.size)
    else:
        assert np.array_equal(np.asarray(ours.convert("RGB")), np.asarray(theirs)), item.name


def test_the_decoder_refuses_what_vllms_refuses(monkeypatch):
    fast_io, _ = media_classes()
    item = samples()[0]
    with pytest.raises(ValueError, match="Failed to load image"):
        fast_io().load_bytes(item.data[: len(item.data) // 3])
    with pytest.raises(ValueError, match="Failed to load image"):
        fast_io().load_bytes(b"not an image at all")
    import vllm.envs as envs

    monkeypatch.setattr(envs, "VLLM_MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="exceed the maximum of 1000 pixels"):
        fast_io().load_bytes(item.data)


@pytest.mark.parametrize("index", [i for i in range(CORPUS_SIZE) if i % 3 == 0])
def test_exact_greyscale_branch_is_bit_identical_to_the_rgb_reference(dev_model_dir, index):
    """The processor's one-band path (a greyscale image, or an RGB one with equal channels)
    against the reference given the RGB conversion vLLM's decoder makes."""
    reference, exact = processors(str(dev_model_dir))
    grey = ImageMediaIO().load_bytes(samples()[index].data).media.convert("L")
    got = exact(images=[[grey]], **VLLM_KWARGS)["pixel_values"]
    assert torch.equal(got, reference(images=[[grey.convert("RGB")]], **VLLM_KWARGS)["pixel_values"])


def test_a_greyscale_image_the_fast_path_declines_reaches_the_reference_as_rgb(dev_model_dir):
    reference, exact = processors(str(dev_model_dir))
    grey = ImageMediaIO().load_bytes(samples()[0].data).media.convert("L")
    kwargs = VLLM_KWARGS | {"do_convert_rgb": False}  # declined: the reference would fail on one band
    expected = reference(images=[[grey.convert("RGB")]], **kwargs)["pixel_values"]
    assert torch.equal(exact(images=[[grey]], **kwargs)["pixel_values"], expected)


@pytest.mark.parametrize("index", range(CORPUS_SIZE))
def test_fast_preprocessing_stays_within_the_stated_bound(pipelines, index):
    item = samples()[index]
    reference, fast = pipelines["reference"](item.data), pipelines["fast"](item.data)
    assert fast.dtype == reference.dtype and fast.shape == reference.shape, item.name
    diff = (fast - reference).abs()
    where = f"{item.name}: max {float(diff.max()):.4f} mean {float(diff.mean()):.5f}"
    assert float(diff.max()) <= MAX_ABS + 1e-6, where
    assert float(diff.mean()) <= MEAN_ABS, where


def test_the_exact_processor_falls_back_to_the_reference_for_pan_and_scan(dev_model_dir):
    reference, exact = processors(str(dev_model_dir))
    item = next(s for s in samples() if s.name.startswith("dermoscopy-4000x600"))
    image = ImageMediaIO().load_bytes(item.data).media
    kwargs = VLLM_KWARGS | {"do_pan_and_scan": True}
    expected = reference(images=[[image]], **kwargs)
    assert int(expected["num_crops"][0]) > 0  # pan-and-scan did crop: the case is real
    got = exact(images=[[image]], **kwargs)
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert torch.equal(got["num_crops"], expected["num_crops"])


def test_the_normalisation_table_is_the_reference_arithmetic(dev_model_dir):
    reference, exact = processors(str(dev_model_dir))
    levels = np.arange(256, dtype=np.uint8)
    expected = (levels.astype(np.float64) * reference.rescale_factor).astype(np.float32)
    expected = ((expected - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)
    assert np.array_equal(exact.normalisation_table(), expected)


def test_the_decoder_marks_what_it_made_rgb_from_greyscale_and_vllms_parser_keeps_the_mark(dev_model_dir):
    """The mark lets the processor skip comparing channels; it must be on exactly the images
    whose channels are equal by construction, survive what vLLM's parser does after the
    decoder, and lead to the reference's pixels."""
    from PIL import Image
    from vllm.multimodal.image import convert_image_mode, normalize_image

    from serving.images.decode import GREY_SOURCE

    reference, exact = processors(str(dev_model_dir))
    fast_io, _ = media_classes()
    marked = 0
    for item in samples():
        with Image.open(io.BytesIO(item.data)) as source:
            grey_source = source.mode == "L" and "transparency" not in source.info
        image = convert_image_mode(normalize_image(fast_io().load_bytes(item.data).media), "RGB")  # the parser's step
        assert bool(image.info.get(GREY_SOURCE)) == grey_source, item.name
        if grey_source:
            marked += 1
            pixels = np.asarray(image)
            assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
            got = exact(images=[[image]], **VLLM_KWARGS)["pixel_values"]
            unmarked = image.copy()
            del unmarked.info[GREY_SOURCE]
            assert torch.equal(got, reference(images=[[unmarked]], **VLLM_KWARGS)["pixel_values"]), item.name
    assert marked >= 5  # the corpus has greyscale sources
