"""The usage writer: whole JSON lines, rotation, and a full disk or a slow one never failing a request."""

import json
import threading

import pytest

from serving.metrics import ServingMetrics
from serving.usage.writer import UsageLog, encode, utc_iso
from prometheus_client import generate_latest

from tests.metrics_text import total


def sample(registry, name, **labels):
    return total(generate_latest(registry).decode(), name, **labels)


def records(n, pad=0):
    return [{"v": 1, "kind": "request", "time": 1_800_000_000.5 + i, "request_id": f"r{i}", "pad": "x" * pad}
            for i in range(n)]  # fmt: skip


def lines_of(*paths):
    out = []
    for path in paths:
        out.extend(json.loads(line) for line in path.read_text().splitlines())
    return out


def test_records_are_whole_json_lines_with_utc_times(tmp_path):
    metrics = ServingMetrics()
    log = UsageLog(tmp_path / "usage.jsonl", metrics)
    for record in records(5):
        log.emit(record)
    log.close()
    written = lines_of(tmp_path / "usage.jsonl")
    assert [r["request_id"] for r in written] == ["r0", "r1", "r2", "r3", "r4"]
    assert written[0]["time"] == "2027-01-15T08:00:00.500Z" == utc_iso(1_800_000_000.5)
    assert sample(metrics.registry, "medgemma_usage_records_written_total") == 5


def test_rotation_keeps_backups_files_of_whole_records(tmp_path):
    metrics = ServingMetrics()
    path = tmp_path / "usage.jsonl"
    size = len(encode(records(1, pad=200)[0]))
    log = UsageLog(path, metrics, max_bytes=size * 3, backups=2)
    for record in records(20, pad=200):
        log.emit(record)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["usage.jsonl", "usage.jsonl.1", "usage.jsonl.2"]  # the oldest were deleted
    kept = lines_of(path.with_name("usage.jsonl.2"), path.with_name("usage.jsonl.1"), path)
    ids = [int(r["request_id"][1:]) for r in kept]
    assert ids == list(range(ids[0], 20))  # oldest to newest, none lost between the files kept
    assert all(p.stat().st_size <= size * 3 for p in tmp_path.iterdir())


def test_a_full_disk_drops_and_counts_records(tmp_path):
    metrics = ServingMetrics()
    log = UsageLog("/dev/full", metrics)  # every write fails with ENOSPC
    for record in records(7):
        log.emit(record)
    log.close()
    assert sample(metrics.registry, "medgemma_usage_records_dropped_total", reason="write_error") == 7
    assert sample(metrics.registry, "medgemma_usage_records_written_total") == 0


def test_the_writer_recovers_when_the_folder_comes_back(tmp_path):
    metrics = ServingMetrics()
    folder = tmp_path / "gone"
    folder.write_text("a file where the folder should be")
    log = UsageLog(folder / "usage.jsonl", metrics)
    log.emit(records(1)[0])
    _wait_for(lambda: sample(metrics.registry, "medgemma_usage_records_dropped_total", reason="write_error") == 1)
    folder.unlink()
    log.emit(records(2)[1])
    log.close()
    assert [r["request_id"] for r in lines_of(folder / "usage.jsonl")] == ["r1"]


def test_a_writer_that_falls_behind_drops_instead_of_queueing_without_bound(tmp_path):
    metrics = ServingMetrics()
    log = UsageLog(tmp_path / "usage.jsonl", metrics, max_pending=3)
    gate, entered = threading.Event(), threading.Event()
    log._write = lambda data, write=log._write: (entered.set(), gate.wait(10), write(data))  # a disk that hangs
    log.emit(records(1)[0])
    assert entered.wait(5)  # the writer holds the first record, blocked in its write
    for record in records(10)[1:]:
        log.emit(record)  # returns at once: 3 wait, 6 are dropped
    assert sample(metrics.registry, "medgemma_usage_records_dropped_total", reason="queue_full") == 6
    gate.set()
    log.close()
    assert len(lines_of(tmp_path / "usage.jsonl")) == 4
    log.emit(records(1)[0])  # after close: counted, never raised
    assert sample(metrics.registry, "medgemma_usage_records_dropped_total", reason="queue_full") == 7


def _wait_for(condition, timeout_s=5.0):
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached")
        time.sleep(0.01)
