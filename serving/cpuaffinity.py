"""CPU build only: keep vLLM's EngineCore on its worker's cores.

vLLM CPU runs the model in a worker process whose OpenMP threads are bound to a set of
cores (``VLLM_CPU_OMP_THREADS_BIND=auto``). The EngineCore process talks to it over a
shared-memory queue and, while it has work, polls that queue in a ``sched_yield`` loop.
Left on the remaining cores, that loop takes one of them whole: on a 2-core machine the
API server, its health probes, /metrics and the clients on the same host were starved
for 50-110 s while two streams ran (measured: a /metrics GET took 107 s; with the
EngineCore on the worker's core, 90 ms at most over 1,035 GETs, and the streams ran as
fast). Sharing the worker's cores, the poll loop only yields to the worker.

Nothing to do when the worker is not bound (``nobind``: its affinity is every core) or
on GPU builds (no separate worker process with its own cores).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

WORKER = "VLLM::Worker"
ENGINE_CORE = "VLLM::EngineCor"  # comm is cut at 15 characters


def colocate_engine_core(root_pid: int | None = None) -> set[int] | None:
    """Pin every thread of the EngineCore under ``root_pid`` (this process by default) to
    the cores of its worker. Returns the cores, or None when there was nothing to pin."""
    import psutil

    try:
        children = psutil.Process(root_pid or os.getpid()).children(recursive=True)
    except psutil.Error:
        return None
    named = []
    for child in children:
        try:
            named.append((child.name(), child))
        except psutil.Error:
            continue
    workers = [proc for name, proc in named if name.startswith(WORKER)]
    cores = [proc for name, proc in named if name.startswith(ENGINE_CORE)]
    if len(workers) != 1 or len(cores) != 1:
        return None  # not the one-worker CPU layout this is for
    try:
        worker_cpus = os.sched_getaffinity(workers[0].pid)
        if worker_cpus == os.sched_getaffinity(cores[0].pid):
            return None  # not bound (nobind), or already together
        for thread in cores[0].threads():
            os.sched_setaffinity(thread.id, worker_cpus)
    except (OSError, psutil.Error) as exc:
        logger.warning("could not move vLLM's EngineCore onto its worker's cores: %s", exc)
        return None
    logger.info("vLLM's EngineCore (pid %d) moved onto its worker's cores %s", cores[0].pid, sorted(worker_cpus))
    return worker_cpus
