"""colocate_engine_core on real processes named like vLLM CPU's worker and EngineCore."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.cpuaffinity import colocate_engine_core

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")

# A child that names itself (comm) and runs a second thread, as the real EngineCore does
# (its socket threads): every thread must move.
CHILD = """
import os, sys, threading, time
open("/proc/self/comm", "w").write(sys.argv[1])
if sys.argv[2]:
    os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("up", flush=True)
time.sleep(60)
"""

# Stands in for the API process: starts one child per line it reads ("NAME CPUS"),
# answers with its pid, and kills them all when its stdin closes.
PARENT = """
import subprocess, sys
children = []
for line in sys.stdin:
    name, _, cpus = line.strip().partition(" ")
    child = subprocess.Popen([sys.executable, "-c", CHILD, name, cpus], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    children.append(child)
    print(child.pid, flush=True)
for child in children:
    child.kill()
    child.wait()
""".replace("CHILD,", repr(CHILD) + ",")


@pytest.fixture
def tree():
    """A process tree of its own: this pytest process may have real vLLM servers as children."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(name: str, cpus: str = "") -> int:
        parent.stdin.write(f"{name} {cpus}\n")
        parent.stdin.flush()
        return int(parent.stdout.readline())

    start.root = parent.pid
    yield start
    parent.stdin.close()
    parent.wait(timeout=30)


def thread_cpus(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


def test_the_engine_core_moves_onto_a_bound_worker_s_cores(tree):
    all_cpus = os.sched_getaffinity(0)
    worker_core = min(all_cpus)
    tree("VLLM::Worker", str(worker_core))
    core = tree("VLLM::EngineCore")
    assert thread_cpus(core) == [all_cpus, all_cpus]

    assert colocate_engine_core(tree.root) == {worker_core}
    assert thread_cpus(core) == [{worker_core}, {worker_core}]
    assert os.sched_getaffinity(tree.root) == all_cpus  # the API process stays where it was
    assert colocate_engine_core(tree.root) is None  # already together: nothing to do


def test_an_unbound_worker_leaves_everything_where_it_is(tree):
    all_cpus = os.sched_getaffinity(0)
    tree("VLLM::Worker")  # VLLM_CPU_OMP_THREADS_BIND=nobind
    core = tree("VLLM::EngineCore")
    assert colocate_engine_core(tree.root) is None
    assert thread_cpus(core) == [all_cpus, all_cpus]


def test_other_layouts_are_left_alone(tree):
    tree("VLLM::EngineCore")  # GPU build: the model runs in the EngineCore itself
    assert colocate_engine_core(tree.root) is None
    tree("VLLM::Worker", "0")
    tree("VLLM::Worker", "1")  # two workers: not the layout this is for
    assert colocate_engine_core(tree.root) is None
