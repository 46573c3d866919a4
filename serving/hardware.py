"""GPU detection for choosing an engine profile, without importing torch or touching CUDA.

Guarantee: ``detect_gpu`` never initialises CUDA in the calling process (vLLM's engine
processes must be the first to do so) and returns None when no NVIDIA GPU is usable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    count: int = 1


# Substrings of nvidia-smi's product name -> engine profile.
_PROFILE_BY_NAME = (
    ("H100", "h100"),
    ("H200", "h100"),
    ("H800", "h100"),
    ("GH200", "h100"),
    ("A100", "a100"),
    ("A800", "a100"),
    ("L4", "l4"),
)


def parse_nvidia_smi(output: str) -> Gpu | None:
    """Parse ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``."""
    rows = [line.split(",") for line in output.strip().splitlines() if line.strip()]
    rows = [r for r in rows if len(r) == 2]
    if not rows:
        return None
    name, memory_mib = rows[0][0].strip(), rows[0][1].strip()
    try:
        memory_gib = float(memory_mib) / 1024
    except ValueError:
        return None
    return Gpu(name=name, memory_gib=round(memory_gib, 1), count=len(rows))


def detect_gpu(timeout_s: float = 10.0) -> Gpu | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return parse_nvidia_smi(result.stdout)


def profile_for(gpu: Gpu | None) -> str | None:
    """The engine profile for ``gpu`` (cpu-dev for none); None for a GPU we have no profile for."""
    if gpu is None:
        return "cpu-dev"
    words = set(re.split(r"[\s\-_]+", gpu.name.upper()))
    for model, profile in _PROFILE_BY_NAME:
        if model in words:  # whole words: "L4" must not match "L40S"
            return profile
    return None


def available_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    container's CPU limit: cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``), at least 1."""
    import math
    import os

    cores = len(os.sched_getaffinity(0))
    quota = period = None
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as f:
            fields = f.read().split()
        if fields and fields[0] != "max":
            quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        try:
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_quota_us")) as f:
                quota = int(f.read())
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_period_us")) as f:
                period = int(f.read())
        except (OSError, ValueError):
            quota = None
    if quota is not None and quota > 0 and period:
        cores = min(cores, math.ceil(quota / period))
    return max(1, cores)
