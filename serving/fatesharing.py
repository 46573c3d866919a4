"""vLLM plugin: a vLLM child process (the engine core, its workers) dies with its parent.

When the process that started vLLM's engine is killed outright (``kill -9`` of a Ray
Serve replica, an OOM kill), nothing tells the engine core: it keeps running, holding the
GPU's memory, and the replacement replica on that GPU cannot load. vLLM runs every
``vllm.general_plugins`` entry point in each of its processes; in the ones that
``multiprocessing`` spawned, this asks the kernel (``PR_SET_PDEATHSIG``) to SIGKILL the
process when its parent exits. The API server itself (no multiprocessing parent) is left
alone, and so is every platform without ``prctl``.

Guarantee: after ``register()`` in a spawned child on Linux, the child does not outlive its
parent; if the parent was already gone when it ran, the child exits at once.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def register() -> None:
    """Entry point (``vllm.general_plugins``)."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent.pid:  # the parent died before the request took effect
        os._exit(1)
