"""A spawned child that ran the plugin dies when its parent is killed; the API server
process (no multiprocessing parent) is left alone."""

import ctypes
import os
import signal
import subprocess
import sys
import time

from serving import fatesharing

PR_GET_PDEATHSIG = 2

CHILD_AND_PARENT = """
import multiprocessing, sys, time
from serving import fatesharing

def child(register, ready):
    if register:
        fatesharing.register()
    ready.set()
    time.sleep(60)

if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=child, args=(sys.argv[1] == "1", ready))
    process.start()
    ready.wait(60)  # the child has run register() (or skipped it) before we report its pid
    print(process.pid, flush=True)
    time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def orphan_survives(register: bool, tmp_path) -> bool:
    script = tmp_path / "parent.py"
    script.write_text(CHILD_AND_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), "1" if register else "0"], stdout=subprocess.PIPE,
                              text=True, cwd=os.getcwd())  # fmt: skip
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)  # kill -9: no clean-up of any kind
    parent.wait()
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    survived = alive(child)
    if survived:
        os.kill(child, signal.SIGKILL)
    return survived


def test_a_spawned_child_dies_with_its_killed_parent(tmp_path):
    assert orphan_survives(False, tmp_path)  # without the plugin the child outlives kill -9
    assert not orphan_survives(True, tmp_path)


def test_the_main_process_is_left_alone():
    fatesharing.register()  # pytest's process has no multiprocessing parent
    libc = ctypes.CDLL(None, use_errno=True)
    sig = ctypes.c_int(-1)
    assert libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0) == 0
    assert sig.value == 0  # no death signal was asked for
