"""vLLM plugin that lets the CPU build of vLLM run Gemma 3 without torchvision.

Guarantee: in a process where ``torchvision`` imports, this does nothing. Where it does
not (the CPU environment: PyPI's torchvision cannot load beside torch+cpu), it makes
``transformers.models.gemma3.image_processing_gemma3`` importable, with
``Gemma3ImageProcessor`` being transformers' PIL-backed ``Gemma3ImageProcessorPil``
(same preprocessing: resize to 896x896, rescale, normalise).

vLLM's gemma3 model module imports that name, and vLLM loads models in several
processes (the API server, the engine core, a model-inspection subprocess). It runs
every ``vllm.general_plugins`` entry point in each of them, which is why this is a
plugin (see ``pyproject.toml``) rather than an import-time patch: a ``.pth`` hook would
make every Python process pay for importing transformers.
"""

from __future__ import annotations

import importlib.util
import sys
import types

GEMMA3_IMAGE_MODULE = "transformers.models.gemma3.image_processing_gemma3"


def torchvision_available() -> bool:
    """True when torchvision is installed and imports beside the installed torch."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):  # a build that does not match torch
        return False
    return True


def register() -> None:
    """Entry point (``vllm.general_plugins``): install the shim when torchvision is missing."""
    if GEMMA3_IMAGE_MODULE in sys.modules or torchvision_available():
        return
    from transformers.models.gemma3 import image_processing_pil_gemma3 as pil

    shim = types.ModuleType(GEMMA3_IMAGE_MODULE)
    shim.__doc__ = "serving.compat: Gemma3ImageProcessor backed by PIL (torchvision missing)."
    shim.Gemma3ImageProcessor = pil.Gemma3ImageProcessorPil
    shim.Gemma3ImageProcessorKwargs = pil.Gemma3ImageProcessorKwargs
    sys.modules[GEMMA3_IMAGE_MODULE] = shim
