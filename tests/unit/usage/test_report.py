"""The usage report (``medgemma-serve usage``): its totals are the sums over the records.

The fixture records are synthetic but real: each one is validated against
``usage-record.schema.json`` before any report runs on it.
"""

import csv
import hashlib
import io
import json
import math
import random
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from serving import cli
from serving.usage import report
from serving.usage.reader import UsageFileError, UsageReader, find_usage_files, parse_record_line

SCHEMA = json.loads((Path(report.__file__).parent / "usage-record.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)
ACCOUNTS = {"acme": "pro", "globex": "basic", "initech": "pro"}
INT_METRICS = ("requests", "completed", "refused", "evicted", "client_left", "prompt_tokens", "completion_tokens", "images")


def key_id_of(account: str, index: int) -> str:
    return hashlib.sha256(f"{account}/{index}".encode()).hexdigest()[:12]


def request_record(rng: random.Random, index: int) -> dict:
    """One varied request record: completed, refused before/after auth, evicted, streams, nulls."""
    day = rng.choice(["2026-12-01", "2026-12-02"])
    time = f"{day}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(1000):03d}Z"
    account = rng.choice(sorted(ACCOUNTS))
    kind = rng.choices(["completed", "completed_4xx", "rejected", "invalid_key", "evicted_gone", "evicted_stalled",
                        "evicted_timeout"], weights=[10, 1, 2, 1, 1, 1, 1])[0]  # fmt: skip
    stream = rng.random() < 0.4
    units = rng.randint(1, 4)
    record = {
        "v": 1, "kind": "request", "time": time, "request_id": f"req-{index}", "account": account,
        "key_id": key_id_of(account, rng.randrange(2)), "plan": ACCOUNTS[account],
        "priority": rng.choice(["stat", "interactive", "batch"]), "model": "medgemma-4b-it",
        "endpoint": "/v1/chat/completions", "stream": stream, "images": rng.randint(0, 3), "image_pixels": 0,
        "prompt_tokens": rng.randint(10, 3000), "completion_tokens": rng.randint(0, 500), "outcome": "completed",
        "status": 200, "error_code": None, "queue_wait_s": round(rng.random(), 3),
        "ttft_s": round(rng.uniform(0.05, 2), 3), "e2e_s": round(rng.uniform(2, 30), 3), "units": units,
        "unit_seconds": round(units * rng.uniform(0.5, 30), 6), "client_left": False, "replica": "host-a:101",
    }  # fmt: skip
    refused = {"prompt_tokens": None, "completion_tokens": None, "queue_wait_s": None, "ttft_s": None, "units": 0,
               "unit_seconds": 0, "e2e_s": round(rng.uniform(0, 0.01), 4)}  # fmt: skip
    if kind == "completed_4xx":
        record.update(status=400, error_code="invalid_request", ttft_s=None, completion_tokens=0)
    elif kind == "rejected":
        record.update(refused, outcome="rejected_concurrency_limit", status=429, error_code="concurrency_limit_exceeded")
    elif kind == "invalid_key":
        record.update(refused, outcome="rejected_invalid_api_key", status=401, error_code="invalid_api_key",
                      account=None, key_id=None, plan=None, priority=None, images=0)  # fmt: skip
    elif kind == "evicted_gone":
        record.update(outcome="evicted_client_gone", status=None, ttft_s=None, client_left=True,
                      completion_tokens=rng.choice([None, 0, 17]))  # fmt: skip
    elif kind == "evicted_stalled":
        record.update(outcome="evicted_client_stalled", stream=True, client_left=True)
    elif kind == "evicted_timeout":
        record.update(refused, outcome="evicted_queue_timeout", status=503, error_code="queue_timeout",
                      queue_wait_s=None, e2e_s=30.0)  # fmt: skip
    return record


def key_change_record(index: int) -> dict:
    return {"v": 1, "kind": "key_change", "time": f"2026-12-01T0{index}:00:00.000Z", "action": "added",
            "account": "acme", "key_id": key_id_of("acme", 0), "source": "cli", "plan": "pro", "actor": "ops"}  # fmt: skip


@pytest.fixture(scope="module")
def records() -> list[dict]:
    rng = random.Random(20261201)
    made = [request_record(rng, i) for i in range(200)] + [key_change_record(i) for i in range(3)]
    for record in made:
        VALIDATOR.validate(record)
    return made


def requests_of(records, **where) -> list[dict]:
    return [r for r in records if r["kind"] == "request" and all(r[k] == v for k, v in where.items())]


def expected_metrics(selected: list[dict]) -> dict:
    """The metrics computed the plain way, record by record."""
    def p95(values):
        values = sorted(v for v in values if v is not None)
        return values[math.ceil(0.95 * len(values)) - 1] if values else None

    return {
        "requests": len(selected),
        "completed": sum(r["outcome"] == "completed" and r["status"] is not None and r["status"] < 400 for r in selected),
        "refused": sum(r["outcome"].startswith("rejected_") for r in selected),
        "evicted": sum(r["outcome"].startswith("evicted_") for r in selected),
        "client_left": sum(r["client_left"] for r in selected),
        "unit_seconds": math.fsum(r["unit_seconds"] for r in selected),
        "unit_hours": math.fsum(r["unit_seconds"] for r in selected) / 3600,
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in selected),
        "completion_tokens": sum(r["completion_tokens"] or 0 for r in selected),
        "images": sum(r["images"] for r in selected),
        "ttft_p95_s": p95(r["ttft_s"] for r in selected),
        "e2e_p95_s": p95(r["e2e_s"] for r in selected),
    }


def write_lines(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.fixture()
def usage_dir(tmp_path, records) -> Path:
    """The records as a server leaves them: a live file and one rotation."""
    write_lines(tmp_path / "usage.jsonl.1", records[:120])
    write_lines(tmp_path / "usage.jsonl", records[120:])
    (tmp_path / "server.log").write_text("not usage\n")
    return tmp_path


def test_the_synthetic_records_cover_the_cases(records):
    requests = requests_of(records)
    assert len(requests) == 200
    assert {r["account"] for r in requests} == {*ACCOUNTS, None}
    assert {r["time"][:10] for r in requests} == {"2026-12-01", "2026-12-02"}
    assert {r["outcome"].split("_")[0] for r in requests} == {"completed", "rejected", "evicted"}
    assert any(r["client_left"] for r in requests) and any(r["stream"] for r in requests)
    assert any(r["ttft_s"] is None for r in requests) and any(r["status"] is None for r in requests)


def test_totals_equal_the_sums_over_all_request_records(records):
    result = report.build_report(records)
    assert result["total"] == expected_metrics(requests_of(records))
    assert result["by"] == ["account"]


def test_each_group_sums_its_own_records_and_the_groups_add_up(records):
    result = report.build_report(records, by=("account", "day"))
    assert len(result["groups"]) == 8  # 3 accounts + unauthenticated, 2 days
    for group in result["groups"]:
        account = None if group["account"] == report.UNAUTHENTICATED else group["account"]
        mine = [r for r in requests_of(records, account=account) if r["time"].startswith(group["day"])]
        assert {m: group[m] for m in report.METRICS} == expected_metrics(mine), group
    for metric in INT_METRICS:
        assert sum(g[metric] for g in result["groups"]) == result["total"][metric]
    assert math.fsum(g["unit_seconds"] for g in result["groups"]) == pytest.approx(result["total"]["unit_seconds"])


def test_every_group_key_groups(records):
    for key in report.GROUP_KEYS:
        result = report.build_report(records, by=(key,))
        assert sum(g["requests"] for g in result["groups"]) == 200
    by_key = report.build_report(records, by=("key",))
    assert {g["key"] for g in by_key["groups"]} == {r["key_id"] or report.NO_VALUE for r in requests_of(records)}


def test_nearest_rank_p95_by_hand():
    assert report.nearest_rank_percentile(list(range(1, 21)), 95) == 19  # ceil(0.95 * 20) = 19th
    assert report.nearest_rank_percentile(list(range(21, 0, -1)), 95) == 20  # ceil(19.95) = 20th
    assert report.nearest_rank_percentile([0.7], 95) == 0.7
    assert report.nearest_rank_percentile([], 95) is None
    rows = [{"kind": "request", "time": "2026-12-01T00:00:00.000Z", "account": "a", "outcome": "completed",
             "status": 200, "ttft_s": t, "e2e_s": 1.0, "unit_seconds": 0.1} for t in [None, 3.0, 1.0, 2.0]]  # fmt: skip
    total = report.build_report(rows)["total"]
    assert total["ttft_p95_s"] == 3.0 and total["e2e_p95_s"] == 1.0
    assert report.build_report(rows[:1])["total"]["ttft_p95_s"] is None


def test_float_sums_are_exact_in_any_order():
    values = [1e16, 1.0, -1e16, 0.1, 0.2]
    for order in (values, values[::-1]):
        total = report.ExactSum()
        for value in order:
            total.add(value)
        assert total.value == math.fsum(values)


def boundary_records() -> list[dict]:
    times = ["2026-12-01T23:59:59.999Z", "2026-12-02T00:00:00.000Z", "2026-12-02T12:00:00.000Z",
             "2026-12-03T00:00:00.000Z"]  # fmt: skip
    return [{"kind": "request", "time": t, "account": "a", "outcome": "completed", "status": 200, "e2e_s": 1.0,
             "unit_seconds": 1.0, "request_id": t} for t in times]  # fmt: skip


@pytest.mark.parametrize(
    "since, until, expected",
    [
        ("2026-12-02", None, 3),  # since is inclusive
        (None, "2026-12-02", 1),  # until is exclusive
        ("2026-12-02", "2026-12-03", 2),
        ("2026-12-02T01:00:00+01:00", "2026-12-02T12:00:00Z", 1),  # an offset is the same instant in UTC
        ("2026-12-01T23:59:59.999Z", "2026-12-01T23:59:59.999Z", 0),
    ],
)
def test_since_is_inclusive_and_until_exclusive(since, until, expected):
    bounds = [report.parse_time_bound(b) if b else None for b in (since, until)]
    assert report.build_report(boundary_records(), since=bounds[0], until=bounds[1])["total"]["requests"] == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "2026-12-01T10:00:00"])
def test_bad_time_bounds_are_refused(text):
    with pytest.raises(report.ReportArgumentError):
        report.parse_time_bound(text)


def test_group_keys_parse_and_refuse():
    assert report.parse_group_keys("account, day") == ("account", "day")
    for text in ["account,model", "", "day,day"]:
        with pytest.raises(report.ReportArgumentError):
            report.parse_group_keys(text)


def run_usage(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["usage", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_csv_parses_and_its_totals_match(usage_dir, records, capsys):
    code, out, _ = run_usage(capsys, str(usage_dir), "--by", "account,day", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    (total,) = [r for r in rows if r["row"] == "total"]
    expected = expected_metrics(requests_of(records))
    for metric in INT_METRICS:
        assert int(total[metric]) == expected[metric]
        assert sum(int(r[metric]) for r in rows if r["row"] == "group") == expected[metric]
    assert float(total["unit_seconds"]) == pytest.approx(expected["unit_seconds"], abs=1e-6)
    assert float(total["ttft_p95_s"]) == pytest.approx(expected["ttft_p95_s"], abs=1e-6)
    assert {r["account"] for r in rows if r["row"] == "group"} == {*ACCOUNTS, report.UNAUTHENTICATED}


def test_cli_json_parses_and_matches_the_records(usage_dir, records, capsys):
    code, out, err = run_usage(capsys, str(usage_dir), "--format", "json", "--since", "2026-12-02")
    assert code == 0 and err == ""
    result = json.loads(out)
    selected = [r for r in requests_of(records) if r["time"] >= "2026-12-02"]
    assert result["total"] == expected_metrics(selected)
    assert (result["since"], result["until"], result["by"], result["skipped_lines"]) == ("2026-12-02T00:00:00Z", None,
                                                                                           ["account"], 0)  # fmt: skip
    for group in result["groups"]:
        account = None if group["account"] == report.UNAUTHENTICATED else group["account"]
        assert group["requests"] == len([r for r in selected if r["account"] == account])


def test_cli_table_names_each_account_and_the_total(usage_dir, capsys):
    code, out, _ = run_usage(capsys, str(usage_dir))
    assert code == 0
    for name in [*ACCOUNTS, report.UNAUTHENTICATED, "TOTAL", "unit_hours", "ttft_p95_s"]:
        assert name in out
    widths = {len(line) for line in out.splitlines()[:2]}
    assert len(widths) == 1  # the header is as wide as its rule


def test_truncated_and_garbage_lines_are_skipped_and_counted(tmp_path, records, capsys):
    good = records[:50]
    truncated = json.dumps(records[50])[:40]  # the crash cut the last line short
    write_lines(tmp_path / "usage.jsonl", good, tail="garbage {\n\n[1, 2]\n" + truncated)
    code, out, err = run_usage(capsys, str(tmp_path / "usage.jsonl"), "--format", "json")
    assert code == 0
    result = json.loads(out)
    assert result["skipped_lines"] == 3  # garbage, a JSON array, the truncated line; the blank line is nothing
    assert result["total"] == expected_metrics(requests_of(good))
    assert "skipped 3 unreadable line(s)" in err


@pytest.mark.parametrize(
    "line",
    ['{"kind": "request", "time": "2026-12-01T00:00:00Z", "prompt_tokens": "12"}',
     '{"kind": "request", "time": "2026-12-01T00:00:00Z", "unit_seconds": NaN}',
     '{"kind": "request", "time": "2026-12-01T00:00:00"}', '{"time": "2026-12-01T00:00:00Z"}', "\xff\xfe"],
)  # fmt: skip
def test_unreadable_records_are_refused_by_the_reader(line):
    assert parse_record_line(line.encode("latin-1") if line.startswith("\xff") else line) is None


def test_a_directory_means_the_live_file_and_its_rotations_each_once(usage_dir):
    files = find_usage_files([usage_dir, usage_dir / "usage.jsonl", str(usage_dir / "usage.jsonl*")])
    assert sorted(f.name for f in files) == ["usage.jsonl", "usage.jsonl.1"]
    reader = UsageReader(files)
    assert sum(1 for _ in reader) == 203 and reader.skipped_lines == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}"], "no such file"),
        (["{dir}/nothing-*.jsonl"], "matches no file"),
        (["{dir}", "--by", "account,model"], "unknown group key 'model'"),
        (["{dir}", "--since", "12/01/2026"], "--since"),
        (["{dir}", "--until", "2026-12-01T00:00:00"], "time zone"),
    ],
)
def test_cli_refuses_bad_arguments_with_exit_2(usage_dir, capsys, args, message):
    args = [a.format(dir=usage_dir, missing=usage_dir / "absent.jsonl") for a in args]
    code, out, err = run_usage(capsys, *args)
    assert code == 2 and out == ""
    assert message in err


def test_cli_refuses_an_empty_directory(tmp_path, capsys):
    code, _, err = run_usage(capsys, str(tmp_path))
    assert code == 2 and "no usage*.jsonl*" in err


def test_an_unreadable_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "usage.jsonl").write_text("")
    monkeypatch.setattr("serving.usage.reader.os.access", lambda path, mode: False)  # root reads anything
    with pytest.raises(UsageFileError, match="not readable"):
        find_usage_files([tmp_path])
