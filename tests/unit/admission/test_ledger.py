"""Lease ids are unique across processes that share a pid (containers) and across forks."""

import os
import shutil
import subprocess
import sys

import pytest

from serving.admission.ledger import InProcessLedger, new_lease_id
from tests.unit.admission.ledgers import check_exact_with_idempotent_release, units_held

PRINT_IDS = "import os; from serving.admission.ledger import new_lease_id; print(os.getpid(), new_lease_id(), new_lease_id())"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root for unshare")
def test_processes_that_are_pid_1_in_their_own_namespaces_make_different_lease_ids():
    outs = [
        subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PRINT_IDS],
                       capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        for _ in range(2)
    ]
    assert [out[0] for out in outs] == ["1", "1"]  # the same pid, as two pods' servers have
    ids = [lease for out in outs for lease in out[1:]]
    assert len(set(ids)) == 4, ids


def test_a_forked_child_does_not_repeat_its_parents_lease_ids():
    read, write = os.pipe()
    before = new_lease_id()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_lease_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    parent = new_lease_id()
    assert len({before, child, parent}) == 3
    assert child.split("-")[0] != parent.split("-")[0]


def test_in_process_ledger_is_exact_and_release_is_idempotent():
    ledger = InProcessLedger()
    check_exact_with_idempotent_release(ledger)
    assert units_held(ledger) == 0
