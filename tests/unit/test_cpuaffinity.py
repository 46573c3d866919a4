"""colocate_engine_core on real processes named like vLLM CPU's worker and EngineCore."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.cpuaffinity import colocate_engine_core

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")

# A child that names itself (comm) and, for the EngineCore, runs a second thread the way
# the real one does (its socket threads): every thread must move.
CHILD = """
import os, sys, threading, time
open("/proc/self/comm", "w").write(sys.argv[1])
if sys.argv[2]:
    os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("up", flush=True)
time.sleep(60)
"""


def spawn(name: str, cpus: str = "") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, name, cpus], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


@pytest.fixture
def children():
    started: list[subprocess.Popen] = []

    def start(name: str, cpus: str = "") -> subprocess.Popen:
        started.append(spawn(name, cpus))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def thread_cpus(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


def test_the_engine_core_moves_onto_a_bound_worker_s_cores(children):
    all_cpus = os.sched_getaffinity(0)
    worker_core = min(all_cpus)
    children("VLLM::Worker", str(worker_core))
    core = children("VLLM::EngineCore")
    assert thread_cpus(core.pid) == [all_cpus, all_cpus]

    assert colocate_engine_core() == {worker_core}
    assert thread_cpus(core.pid) == [{worker_core}, {worker_core}]
    assert os.sched_getaffinity(0) == all_cpus  # this process stays where it was
    assert colocate_engine_core() is None  # already together: nothing to do


def test_an_unbound_worker_leaves_everything_where_it_is(children):
    all_cpus = os.sched_getaffinity(0)
    children("VLLM::Worker")  # VLLM_CPU_OMP_THREADS_BIND=nobind
    core = children("VLLM::EngineCore")
    assert colocate_engine_core() is None
    assert thread_cpus(core.pid) == [all_cpus, all_cpus]


def test_other_layouts_are_left_alone(children):
    children("VLLM::EngineCore")  # GPU build: the model runs in the EngineCore itself
    assert colocate_engine_core() is None
    children("VLLM::Worker", "0")
    children("VLLM::Worker", "1")  # two workers: not the layout this is for
    assert colocate_engine_core() is None
