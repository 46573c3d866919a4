"""vLLM plugin that picks Gemma 3's image preprocessing in every vLLM process.

``MEDGEMMA_IMAGE_PREPROCESSING`` (the ``image_preprocessing`` setting, exported by the
launcher) chooses:
 - ``fast`` (default): ``serving.images``: decoding to no more pixels than the model can
   use (the ``medgemma`` media connector, selected by ``VLLM_MEDIA_CONNECTOR``) and
   ``ExactImageProcessor``;
 - ``exact``: ``ExactImageProcessor``, bit-identical to transformers' PIL processor;
 - ``reference``: what vLLM does alone. Where ``torchvision`` imports, that is
   transformers' torchvision processor and this plugin does nothing; where it does not
   (the CPU environment: PyPI's torchvision cannot load beside torch+cpu), it makes
   ``transformers.models.gemma3.image_processing_gemma3`` importable with
   ``Gemma3ImageProcessor`` being transformers' PIL-backed ``Gemma3ImageProcessorPil``
   (same preprocessing: resize to 896x896, rescale, normalise).
``fast`` and ``exact`` replace the processor on every host, torchvision or not, so the
model gets the same pixels on GPU hosts as in this project's fidelity tests.

vLLM's gemma3 model module imports that name, and vLLM loads models in several
processes (the API server, the engine core, a model-inspection subprocess). It runs
every ``vllm.general_plugins`` entry point in each of them, which is why this is a
plugin (see ``pyproject.toml``) rather than an import-time patch: a ``.pth`` hook would
make every Python process pay for importing transformers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types

GEMMA3_IMAGE_MODULE = "transformers.models.gemma3.image_processing_gemma3"
PREPROCESSING_ENV = "MEDGEMMA_IMAGE_PREPROCESSING"
PREPROCESSING_MODES = ("fast", "exact", "reference")


def torchvision_available() -> bool:
    """True when torchvision is installed and imports beside the installed torch."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # a build that does not match torch
        return False
    return True


def preprocessing_mode() -> str:
    mode = os.environ.get(PREPROCESSING_ENV, "fast")
    if mode not in PREPROCESSING_MODES:
        raise ValueError(f"{PREPROCESSING_ENV}={mode!r}: choose one of {PREPROCESSING_MODES}")
    return mode


def register() -> None:
    """Entry point (``vllm.general_plugins``): install the chosen image preprocessing."""
    mode = preprocessing_mode()
    logger = logging.getLogger(__name__)
    logger.info("image preprocessing: %s", mode)
    if mode == "fast":
        from serving.images import decode

        decode.register()
    if mode == "reference" and torchvision_available():
        return  # vLLM alone, as on any GPU host
    from transformers.models.gemma3 import image_processing_pil_gemma3 as pil

    processor = pil.Gemma3ImageProcessorPil  # reference without torchvision
    if mode != "reference":
        from serving.images.processor import ExactImageProcessor as processor

        use_processor(processor)
    if GEMMA3_IMAGE_MODULE in sys.modules:
        if sys.modules[GEMMA3_IMAGE_MODULE].Gemma3ImageProcessor is not processor:
            logger.info("%s was imported before this plugin; vLLM's type names keep its class", GEMMA3_IMAGE_MODULE)
        return
    shim = types.ModuleType(GEMMA3_IMAGE_MODULE)
    shim.__doc__ = f"serving.compat: Gemma3ImageProcessor is {processor.__module__}.{processor.__name__}."
    shim.Gemma3ImageProcessor = processor
    shim.Gemma3ImageProcessorKwargs = pil.Gemma3ImageProcessorKwargs
    sys.modules[GEMMA3_IMAGE_MODULE] = shim


def use_processor(processor: type) -> None:
    """Make transformers build ``processor`` wherever it would build a Gemma 3 image processor.

    vLLM loads ``Gemma3Processor.from_pretrained``; transformers picks the image processor's
    class name by backend (``Gemma3ImageProcessor`` with torchvision, ``...Pil`` without) and
    looks the name up as an attribute of ``transformers.models.gemma3``
    (``get_image_processor_class_from_name``): both names there become ``processor``."""
    import transformers.models.gemma3 as gemma3

    for name in ("Gemma3ImageProcessor", "Gemma3ImageProcessorPil"):
        setattr(gemma3, name, processor)
