import pytest

from loadtests.client import RequestRecord, classify
from loadtests.profiles import Stage
from loadtests.runner import StageResult
from loadtests.summary import peak_concurrency, percentiles, summarize_stage


def record(i, start, ttft=0.1, e2e=1.0, status=200, tokens=10, images=1, chunks=None):
    r = RequestRecord(i, 0, "k", images, 1000 * images, 2000, tokens, None, start_s=start, ttft_s=ttft, e2e_s=e2e,
                      status=status, prompt_tokens=20, output_tokens=tokens if status == 200 else None,
                      content_chunks=tokens if chunks is None else chunks)  # fmt: skip
    r.outcome = classify(status, None)
    return r


def test_percentiles_interpolate():
    stats = percentiles([float(x) for x in range(1, 101)])
    assert stats["p50"] == pytest.approx(50.5) and stats["p99"] == pytest.approx(99.01)
    assert percentiles([])["p50"] is None


def test_outcomes_window_goodput_and_throughput_add_up():
    stage = Stage("concurrency", concurrency=2, duration_s=10, warmup_s=1, cooldown_s=1)
    records = [record(i, 0.5 + i) for i in range(10)]  # starts 0.5 .. 9.5; window [1, 9]
    records[3] = record(3, 3.5, status=429)
    records[4] = record(4, 4.5, e2e=5.0)  # misses the E2E SLO
    records[5] = record(5, 5.5, status=500)
    result = StageResult(0, stage, 0.0, 12.0, 9.5, records)
    for r in records:
        low, high = result.window
        r.in_window = low <= r.start_s <= high
    s = summarize_stage(result, {"ttft": 0.5, "e2e": 2.0})
    assert s["requests"] == {"sent": 10, "in_window": 8, "completed_ok": 6, "excluded_warmup_cooldown": 2}
    assert s["outcomes"] == {"ok": 6, "rate_limited": 1, "server_error": 1}
    assert s["goodput"]["met"] == 5 and s["goodput"]["ratio"] == pytest.approx(5 / 8)
    assert s["throughput"]["requests_per_s"] == pytest.approx(6 / 8)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(60 / 8)
    assert s["latency_s"]["tpot"]["p50"] == pytest.approx((1.0 - 0.1) / 9)
    assert s["warnings"] == []


def test_token_disagreement_and_rate_shortfall_warn():
    stage = Stage("rate", rate=10, duration_s=10)
    records = [record(i, i * 1.0, chunks=3) for i in range(10)]
    for r in records:
        r.scheduled_s = r.start_s
    s = summarize_stage(StageResult(0, stage, 0.0, 11.0, 9.0, records), {})
    text = " ".join(s["warnings"])
    assert "achieved 1.00 req/s of 10.00 offered" in text
    assert "content chunks" in text


def test_peak_concurrency():
    records = [record(0, 0.0, e2e=3), record(1, 1.0, e2e=1), record(2, 1.5, e2e=1), record(3, 5.0, e2e=1)]
    assert peak_concurrency(records) == 3
