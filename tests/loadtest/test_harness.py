"""The real ``medgemma-loadtest`` CLI against the session's real vLLM CPU server."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--prompt-tokens", "uniform:8,32", "--image-size", "uniform:128,384", "--image-pool", "3"]


def loadtest(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_closed_loop_report_is_complete_and_consistent(server, tmp_path):
    out = tmp_path / "closed"
    result = loadtest(
        "run", "--url", server.url, "--key", f"main={server.keys['main']}", "--concurrency", "3",
        "--duration", "12", "--warmup", "1", "--cooldown", "1", "--images", "choice:0=0.3,1=0.5,2=0.2",
        "--output-tokens", "12", "--image-format", "jpeg,png", "--out", str(out), *SMALL,
    )  # fmt: skip
    assert "TTFT p50" in result.stdout and "concurrency 3" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    rows = records(out / "requests.jsonl")
    # Keys are mgk_...: none reaches the report, the request records or the console.
    written = {path.name: path.read_bytes().decode(errors="replace") for path in out.rglob("*") if path.is_file()}
    assert {"summary.json", "requests.jsonl"} <= set(written)
    for name, text in {**written, "stdout": result.stdout, "stderr": result.stderr}.items():
        assert server.keys["main"] not in text and "mgk_" not in text, name
    (stage,) = summary["stages"]
    counts = stage["requests"]
    assert counts["sent"] == len(rows) == counts["in_window"] + counts["excluded_warmup_cooldown"]
    assert sum(stage["outcomes"].values()) == counts["in_window"]
    assert stage["outcomes"].get("ok") == counts["completed_ok"] == counts["in_window"] > 5
    assert stage["by_status"] == {"200": counts["in_window"]}
    for row in rows:
        assert row["outcome"] == "ok" and 0 < row["ttft_s"] <= row["e2e_s"]
        assert row["output_tokens"] == 12 and row["content_chunks"] >= 1
        assert row["prompt_tokens"] >= 256 * row["images"]  # usage counts 256 tokens per image
        assert len(row["itl_s"]) == row["content_chunks"] - 1
    window = stage["window_s"]
    assert window == pytest.approx(10.0)
    assert stage["throughput"]["requests_per_s"] == pytest.approx(counts["completed_ok"] / window)
    assert stage["throughput"]["output_tokens_per_s"] == pytest.approx(12 * counts["completed_ok"] / window)
    latency = stage["latency_s"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        values = [latency[name][k] for k in ("p50", "p90", "p95", "p99", "p99.9")]
        assert values == sorted(values) and values[0] > 0
    assert latency["ttft"]["p50"] <= latency["e2e"]["p50"]
    assert 1 <= stage["peak_concurrency"] <= 3
    assert set(stage["ttft_by_images_s"]) <= {"0", "1", "2"} and len(stage["ttft_by_images_s"]) >= 2
    assert stage["image_bytes_per_request"]["max"] > 0
    assert 0 <= stage["goodput"]["ratio"] <= 1
    assert set(summary["definitions"]) >= {"ttft", "tpot", "itl", "e2e", "goodput"}
    assert summary["config"]["keys"] == ["main"]
    assert (out / "report.html").stat().st_size > 10_000


def test_open_loop_achieves_the_offered_rate(server, tmp_path):
    out = tmp_path / "open"
    loadtest(
        "run", "--url", server.url, "--key", f"main={server.keys['main']}", "--rate", "4", "--duration", "15",
        "--images", "0", "--output-tokens", "4", "--out", str(out), *SMALL,
    )  # fmt: skip
    (stage,) = json.loads((out / "summary.json").read_text())["stages"]
    rate = stage["rate"]
    assert rate["offered_per_s"] == pytest.approx(4.0)
    assert rate["achieved_per_s"] == pytest.approx(4.0, rel=0.3)
    assert rate["send_lag_s"]["p99"] < 0.25  # the generator kept to its schedule
    assert stage["outcomes"] == {"ok": stage["requests"]["in_window"]}


def test_budget_limited_account_gets_429s_in_their_own_bucket(server, tmp_path):
    out = tmp_path / "budget"
    loadtest(
        "run", "--url", server.url, "--key", f"big={server.keys['loadtest']}@1",
        "--key", f"small={server.keys['loadtest-small']}@3", "--concurrency", "4", "--requests", "30",
        "--images", "0", "--output-tokens", "24", "--out", str(out), *SMALL,
    )  # fmt: skip
    (stage,) = json.loads((out / "summary.json").read_text())["stages"]
    assert stage["outcomes"]["rate_limited"] > 0 and stage["outcomes"]["ok"] > 0
    assert set(stage["outcomes"]) == {"ok", "rate_limited"}  # 429s are not errors
    assert stage["by_status"]["429"] == stage["outcomes"]["rate_limited"]
    assert stage["by_error_code"] == {"concurrency_limit_exceeded": stage["outcomes"]["rate_limited"]}
    rows = records(out / "requests.jsonl")
    assert {r["key"] for r in rows if r["outcome"] == "rate_limited"} == {"small"}
    assert stage["goodput"]["met"] <= stage["outcomes"]["ok"] < stage["requests"]["in_window"]


def test_html_report_renders_in_headless_chromium(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/install-system-deps.sh"
    out = tmp_path / "html"
    loadtest(
        "run", "--url", server.url, "--key", f"main={server.keys['main']}", "--sweep-concurrency", "1,2",
        "--duration", "5", "--images", "1", "--output-tokens", "6", "--out", str(out), *SMALL,
    )  # fmt: skip
    page = (out / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert 'data-report-ready="ok"' in dom.stdout, dom.stderr[-3000:]
    assert 'data-plots="6"' in dom.stdout  # five plots plus goodput vs load for a sweep
    assert "Uncaught" not in dom.stderr
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1400,1800", page],
                   capture_output=True, timeout=120)  # fmt: skip
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ab_mode_interleaves_and_reports_spread(server, tmp_path):
    out = tmp_path / "ab"
    result = loadtest(
        "ab", "--url", server.url, "--url-b", server.url, "--key", f"main={server.keys['main']}", "--rounds", "2",
        "--concurrency", "2", "--requests", "6", "--images", "1", "--output-tokens", "6", "--out", str(out), *SMALL,
    )  # fmt: skip
    assert "B-A median" in result.stdout
    doc = json.loads((out / "ab.json").read_text())
    figures = doc["comparison"][0]["figures"]
    assert len(figures["ttft_p50_ms"]["delta_per_round"]) == 2
    assert figures["requests_per_s"]["ratio_median"] > 0
    for arm in ("a", "b"):
        rows = records(out / arm / "requests.jsonl")
        assert len(rows) == 12 and {r["round"] for r in rows} == {0, 1}
    bodies_a = [r["image_bytes"] for r in records(out / "a" / "requests.jsonl") if r["round"] == 0]
    bodies_b = [r["image_bytes"] for r in records(out / "b" / "requests.jsonl") if r["round"] == 0]
    assert sorted(bodies_a) == sorted(bodies_b)  # the same workload on both sides


def test_locust_file_drives_the_same_workload(server, tmp_path):
    env = dict(os.environ, MEDGEMMA_LOADTEST_KEY=json.dumps([f"main={server.keys['main']}"]),
               MEDGEMMA_LOADTEST_IMAGES="1", MEDGEMMA_LOADTEST_OUTPUT_TOKENS="6",
               MEDGEMMA_LOADTEST_IMAGE_SIZE="uniform:128,256", MEDGEMMA_LOADTEST_IMAGE_POOL="2")  # fmt: skip
    locust = Path(sys.executable).parent / "locust"
    result = subprocess.run(
        [str(locust), "-f", "loadtests/locustfile.py", "--headless", "-u", "2", "-r", "2", "-t", "8s",
         "--host", server.url, "--csv", str(tmp_path / "locust"), "--only-summary"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stats = {row["Name"]: row for row in csv.DictReader((tmp_path / "locust_stats.csv").open())}
    assert int(stats["chat (stream)"]["Request Count"]) > 0
    assert int(stats["chat (stream)"]["Failure Count"]) == 0
    assert int(stats["ttft"]["Request Count"]) > 0


def test_the_stat_under_batch_flood_scenario_reports_per_class_and_account(server, tmp_path):
    """The shipped scenario file, shortened: a batch flood beside a STAT trickle on the real
    server. Every figure comes per stream, per class (as the server ran it) and per account."""
    out = tmp_path / "flood"
    env = dict(os.environ, MEDGEMMA_BATCH_KEY=server.keys["backlog"], MEDGEMMA_STAT_KEY=server.keys["stat-clinic"])
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.cli", "run", "--scenario", "loadtests/scenarios/stat-under-batch-flood.yaml",
         "--url", server.url, "--duration", "16", "--warmup", "2", "--cooldown", "1", "--out", str(out), *SMALL],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (stage,) = json.loads((out / "summary.json").read_text())["stages"]
    assert set(stage["by_stream"]) == {"backlog", "stat"}
    assert set(stage["by_priority"]) == {"batch", "stat"}  # the classes the server says it ran
    assert set(stage["by_key"]) == {"backlog", "clinic"}
    stat = stage["by_priority"]["stat"]
    assert stat["requests"]["in_window"] >= 2
    assert stat["outcomes"] == {"ok": stat["requests"]["in_window"]}  # no STAT request refused
    batch = stage["by_priority"]["batch"]
    assert batch["outcomes"].get("ok", 0) > 0 and batch["throughput"]["output_tokens_per_s"] > 0
    rows = records(out / "requests.jsonl")
    assert {(r["stream"], r["key"], r["priority"]) for r in rows if r["outcome"] == "ok"} == {
        ("backlog", "backlog", "batch"), ("stat", "clinic", "stat")}  # fmt: skip
    for field in ("by_priority", "by_key", "by_stream"):
        assert sum(g["requests"]["in_window"] for g in stage[field].values()) == stage["requests"]["in_window"]
    assert "  class stat" in result.stdout and "  stream backlog" in result.stdout
    written = " ".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    assert "mgk_" not in written + result.stdout + result.stderr  # labels, never keys


def test_capacity_search_writes_a_capacity_file_for_the_engine_it_measured(server, tmp_path):
    """A short search on the real server (a loose SLO, saturation not checked: it holds up to
    the search's maximum):
    capacity.json names the units, the engine's profile and vLLM version from the server's
    build info, and every point's figures; its page renders its three plots."""
    import vllm

    out = tmp_path / "capacity"
    result = loadtest(
        "capacity", "--url", server.url, "--key", f"main={server.keys['main']}", "--search-max", "3",
        "--duration", "8", "--images", "1", "--output-tokens", "6", "--slo-ttft-ms", "60000",
        "--slo-tpot-ms", "10000", "--slo-percentile", "50", "--search-repeats", "1", "--search-min-gain", "-1",
        "--out", str(out), *SMALL,
    )  # fmt: skip
    doc = json.loads((out / "capacity.json").read_text())
    assert "concurrency    1: holds" in result.stdout and "capacity: 3 units per replica" in result.stdout
    assert (doc["units_per_replica"], doc["concurrency"], doc["stopped"]) == (3, 3, "max_concurrency")
    assert doc["engine"]["profile"] == "cpu-dev" and doc["engine"]["vllm_version"] == vllm.__version__
    assert doc["slo"] == {"ttft_ms": 60000.0, "tpot_ms": 10000.0, "percentile": 50.0, "min_ok": 0.99}
    assert doc["workload"]["images"] == "1" and doc["workload"]["keys"] == ["main"]
    assert [p["concurrency"] for p in doc["points"]] == [1, 2, 3]
    for point in doc["points"]:
        assert point["verdict"] == "holds" and point["ok"] == point["requests"] > 0
        assert 0 < point["ttft_s"]["low"] <= point["ttft_s"]["value"] <= point["ttft_s"]["high"] < 60
    assert server.keys["main"] not in (out / "capacity.json").read_text() + result.stdout
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/install-system-deps.sh"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'p'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", (out / "capacity.html").resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert 'data-report-ready="ok"' in dom.stdout and 'data-plots="3"' in dom.stdout, dom.stderr[-3000:]


def test_capacity_search_that_misses_at_its_start_exits_1_with_no_units(server, tmp_path):
    out = tmp_path / "strict"
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.cli", "capacity", "--url", server.url, "--key",
         f"main={server.keys['main']}", "--duration", "3", "--images", "0", "--output-tokens", "4",
         "--slo-ttft-ms", "0.001", "--out", str(out), *SMALL],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    doc = json.loads((out / "capacity.json").read_text())
    assert (doc["units_per_replica"], doc["stopped"], doc["bracket"]["misses_at"]) == (0, "missed_at_start", 1)
    assert "over 0.001 ms" in doc["points"][0]["reasons"][0]


def test_capacity_refuses_a_load_shape_of_its_own(tmp_path):
    scenario = tmp_path / "shaped.yaml"
    scenario.write_text("concurrency: 4\nimages: 1\n")
    result = subprocess.run([sys.executable, "-m", "loadtests.cli", "capacity", "--scenario", str(scenario)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2 and "leave out concurrency" in result.stderr
