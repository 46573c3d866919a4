"""The host ledger: exact budgets across API processes that share a host (and a pid)."""

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.admission.host_ledger import HostLedger, HostLedgerFile, HostTable, account_key
from serving.admission.ledger import LedgerUnavailable
from tests.live_server import pid_namespace_prefix
from tests.unit.admission.host_ledger_worker import BUDGETS
from tests.unit.admission.ledgers import check_exact_with_idempotent_release

pytestmark = pytest.mark.unit


@pytest.fixture
def table_file(tmp_path):
    file = HostLedgerFile.create(slots=4, rows=64, directory=str(tmp_path))
    yield file
    file.remove()


def test_one_process_is_exact_and_release_is_idempotent(table_file):
    ledger = HostLedger(table_file.path, 0)
    check_exact_with_idempotent_release(ledger)
    assert ledger.acquire_now("acme", 3, 3).inflight == 3


def test_two_slots_share_one_budget_per_account(table_file):
    a, b = HostLedger(table_file.path, 0), HostLedger(table_file.path, 1)
    held = a.acquire_now("acme", 2, 3)
    assert b.acquire_now("acme", 2, 3).lease is None  # the other process's 2 count
    one = b.acquire_now("acme", 1, 3)
    assert one.lease is not None and one.inflight == 3
    assert asyncio.run(a.inflight("acme")) == asyncio.run(b.inflight("acme")) == 3
    assert b.acquire_now("other", 3, 3).lease is not None  # accounts are apart
    a.release_now(held.lease)
    assert asyncio.run(b.inflight("acme")) == 1


def test_a_new_process_in_a_slot_starts_from_an_empty_column(table_file):
    HostLedger(table_file.path, 1).acquire_now("acme", 3, 3)  # its process died without releasing
    restarted = HostLedger(table_file.path, 1)
    assert restarted.acquire_now("acme", 3, 3).lease is not None


def test_a_full_table_refuses_a_new_account_and_keeps_serving_known_ones(tmp_path):
    file = HostLedgerFile.create(slots=1, rows=2, directory=str(tmp_path))
    ledger = HostLedger(file.path, 0)
    ledger.acquire_now("a", 1, 1)
    ledger.acquire_now("b", 1, 5)
    with pytest.raises(LedgerUnavailable, match="full"):
        ledger.acquire_now("c", 1, 5)
    assert ledger.acquire_now("b", 1, 5).inflight == 2


def test_rows_of_accounts_that_hold_nothing_go_to_new_accounts(tmp_path):
    """Over a server's life more accounts than rows come and go (renames, reloads)."""
    file = HostLedgerFile.create(slots=2, rows=4, directory=str(tmp_path))
    a, b = HostLedger(file.path, 0), HostLedger(file.path, 1)
    held = [a.acquire_now("steady", 1, 5)]  # keeps its row throughout
    for i in range(50):  # 50 accounts through 3 free rows, from both processes
        ledger = (a, b)[i % 2]
        grant = ledger.acquire_now(f"passing-{i}", 2, 2)
        assert grant.lease is not None and grant.inflight == 2
        assert ledger.acquire_now(f"passing-{i}", 1, 2).lease is None  # still exact while it holds
        ledger.release_now(grant.lease)
    assert asyncio.run(b.inflight("steady")) == 1
    assert a.acquire_now("steady", 4, 5).inflight == 5 and a.acquire_now("steady", 1, 5).lease is None
    assert held[0].lease is not None


def test_a_file_whose_creator_is_gone_is_removed_by_the_next_one(tmp_path):
    """A killed server cannot remove its file; /dev/shm may outlive the container."""
    abandoned = tmp_path / "medgemma-ledger-old"
    abandoned.write_bytes(b"\0" * 64)  # nobody holds its lock
    alive = HostLedgerFile.create(slots=1, rows=4, directory=str(tmp_path))
    HostLedgerFile.create(slots=1, rows=4, directory=str(tmp_path))
    assert not abandoned.exists()
    assert alive.path.exists()  # its creator (this process) still holds it
    held_elsewhere = subprocess.Popen([sys.executable, "-c", HOLD_A_LEDGER, str(tmp_path)], stdout=subprocess.PIPE,
                                      stdin=subprocess.PIPE, text=True)  # fmt: skip
    other = Path(held_elsewhere.stdout.readline().strip())
    HostLedgerFile.create(slots=1, rows=4, directory=str(tmp_path))
    assert other.exists()  # another live process's file stays
    held_elsewhere.communicate("", timeout=30)  # it exits without removing it
    HostLedgerFile.create(slots=1, rows=4, directory=str(tmp_path))
    assert not other.exists()


HOLD_A_LEDGER = """
import sys
from serving.admission.host_ledger import HostLedgerFile
file = HostLedgerFile.create(slots=1, rows=4, directory=sys.argv[1])
print(file.path, flush=True)
sys.stdin.read()
"""


def test_a_slot_outside_the_table_and_a_file_that_is_no_ledger_are_refused(table_file, tmp_path):
    with pytest.raises(ValueError, match="slot 4"):
        HostLedger(table_file.path, 4)
    other = tmp_path / "other"
    other.write_bytes(b"\0" * 64)
    with pytest.raises(LedgerUnavailable, match="not a host ledger"):
        HostTable(other)


def test_account_keys_are_stable_and_never_the_empty_marker():
    assert account_key("acme") == account_key("acme") != account_key("acme2")
    assert all(account_key(f"a{i}") != 0 for i in range(1000))


def test_the_table_lives_in_shared_memory_and_is_removed():
    file = HostLedgerFile.create(slots=2)
    try:
        assert str(file.path).startswith("/dev/shm/") or not os.path.isdir("/dev/shm")
        assert file.path.stat().st_size == 8 * (3 + 65536 * 3)
    finally:
        file.remove()
    assert not file.path.exists()


def most_held_at_once(holds: list[dict], account: str) -> int:
    """The largest sum of units over holds of ``account`` that overlap in time."""
    events = sorted(
        [(h["from"], 1, h["units"]) for h in holds if h["account"] == account and h["from"] < h["to"]]
        + [(h["to"], 0, -h["units"]) for h in holds if h["account"] == account and h["from"] < h["to"]]
    )  # at one instant an end sorts before a start: intervals are inside the real holds
    held = most = 0
    for _, _, units in events:
        held += units
        most = max(most, held)
    return most


def run_processes(path, mode: str, processes: int = 4, ops: int = 400) -> list[dict]:
    """Worker processes, each pid 1 of its own pid namespace (as containers' servers are),
    all starting their work at one CLOCK_MONOTONIC instant once every one has started."""
    start_at = time.monotonic() + 3.0
    argv = [sys.executable, "-m", "tests.unit.admission.host_ledger_worker", str(path)]
    workers = [
        subprocess.Popen([*pid_namespace_prefix(), *argv, str(slot), str(slot), str(ops), mode, str(start_at)],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
        for slot in range(processes)
    ]
    try:
        outputs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0] * processes
    return [json.loads(line) for out in outputs for line in out.splitlines()]


def overlapping_processes(holds: list[dict], account: str) -> bool:
    """Whether holds of ``account`` from different processes overlapped in time."""
    mine = sorted((h["from"], h["to"], h["slot"]) for h in holds if h["account"] == account)
    return any(b[0] < a[1] and a[2] != b[2] for i, a in enumerate(mine) for b in mine[i + 1 : i + 40])


def test_processes_sharing_a_pid_never_hold_more_than_the_budget_together(table_file):
    holds = run_processes(table_file.path, "host")
    for account, budget in BUDGETS.items():
        assert sum(1 for h in holds if h["account"] == account) > 50  # the workload ran
        assert overlapping_processes(holds, account)  # processes shared the budget at once
        assert most_held_at_once(holds, account) <= budget
    with HostTable(table_file.path) as table:  # every process gave back what it took
        for account in BUDGETS:
            assert table.held(table.row(account_key(account), insert=False)) == 0


def test_the_check_sees_an_overrun_when_each_process_keeps_its_own_ledger(table_file):
    """The control: the same workload on per-process ledgers (one budget per process, the
    defect of a naive multi-process server) goes over the budget, and the check says so."""
    holds = run_processes(table_file.path, "own")
    assert any(most_held_at_once(holds, account) > budget for account, budget in BUDGETS.items())
