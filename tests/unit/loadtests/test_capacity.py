"""The capacity search against a replica given as a latency model (no server, no sleeps):
a known knee, found within one search step, with its uncertainty reported."""

from __future__ import annotations

import math
import random

import pytest

from loadtests.capacity import CLOSE, HOLDS, MISSES, CapacitySearch, Slo, judge, quantile_interval
from loadtests.client import RequestRecord

P95_OF_JITTER = math.exp(1.6449 * 0.05)  # the 95th percentile of the model's lognormal noise


class ModelReplica:
    """A closed loop against one replica, computed rather than slept. Up to ``slots``
    requests run at once and each token takes ``tpot0 + per_seq * batch``; beyond the slots
    requests queue (their TTFT grows by the wait, from Little's law). Every latency carries
    lognormal noise (sigma 0.05). Beyond ``refuse_above`` in flight, the surplus is refused
    with 503s. Seeded: the same calls give the same records."""

    def __init__(self, slots=64, tpot0=0.02, per_seq=0.001, prefill_s=0.15, output_tokens=64, window_s=60.0,
                 refuse_above=None, seed=7):  # fmt: skip
        self.slots, self.tpot0, self.per_seq = slots, tpot0, per_seq
        self.prefill_s, self.output_tokens, self.window_s = prefill_s, output_tokens, window_s
        self.refuse_above = refuse_above
        self.rng = random.Random(seed)
        self.calls: list[int] = []

    def tpot(self, concurrency: int) -> float:
        return self.tpot0 + self.per_seq * min(concurrency, self.slots)

    def __call__(self, concurrency: int) -> tuple[list[RequestRecord], float]:
        self.calls.append(concurrency)
        served = min(concurrency, self.refuse_above or concurrency)
        batch = min(served, self.slots)
        service_s = self.prefill_s + self.tpot(served) * (self.output_tokens - 1)
        wait_s = max(0, served - self.slots) / self.slots * service_s
        records = []
        for index in range(int(batch / service_s * self.window_s)):
            noise = lambda: self.rng.lognormvariate(0, 0.05)  # noqa: E731
            ttft = (self.prefill_s + wait_s) * noise()
            record = RequestRecord(index, 0, "main", 0, 0, 100, self.output_tokens, None, start_s=index * 0.01,
                                   ttft_s=ttft, e2e_s=ttft + self.tpot(served) * noise() * (self.output_tokens - 1),
                                   status=200, outcome="ok", output_tokens=self.output_tokens)  # fmt: skip
            records.append(record)
        refused = len(records) * (concurrency - served) // max(served, 1)
        records += [RequestRecord(10_000 + i, 0, "main", 0, 0, 100, self.output_tokens, None, status=503,
                                  outcome="overloaded") for i in range(refused)]  # fmt: skip
        return records, self.window_s

    def knee(self, tpot_limit_s: float) -> int:
        """The highest concurrency whose true TPOT p95 is within ``tpot_limit_s``."""
        return math.floor((tpot_limit_s / P95_OF_JITTER - self.tpot0) / self.per_seq)


@pytest.mark.parametrize("per_seq, resolution", [(0.001, 0.0), (0.0003, 0.05), (0.0001, 0.05)])
def test_the_search_finds_a_known_knee_within_one_step(per_seq, resolution):
    replica = ModelReplica(slots=512, per_seq=per_seq)
    slo = Slo(ttft_s=2.0, tpot_s=0.06)
    knee = replica.knee(0.06)  # 35, 117 and 352
    result = CapacitySearch(replica, slo, max_concurrency=1024, resolution=resolution).run()
    step = max(1, math.floor(knee * resolution))
    assert result.stopped == "bisected"
    assert knee - step <= result.capacity <= knee <= result.misses_at <= knee + step + 1, (knee, result)
    assert result.misses_at - result.capacity <= step
    # doubling from 1 until a miss, then bisecting inside the last doubling
    tried = list(dict.fromkeys(replica.calls))
    top = 2 ** math.ceil(math.log2(result.misses_at))
    assert tried[: int(math.log2(top)) + 1] == [2**i for i in range(int(math.log2(top)) + 1)]
    assert all(top // 2 < c < top for c in tried[int(math.log2(top)) + 1 :])
    verdicts = {p.concurrency: p.verdict for p in result.points}
    assert all(v == HOLDS for c, v in verdicts.items() if c <= result.capacity)
    assert all(v == MISSES for c, v in verdicts.items() if c >= result.misses_at)


def test_every_point_carries_its_interval_and_close_points_are_measured_again():
    replica = ModelReplica(slots=512, per_seq=0.001)
    result = CapacitySearch(replica, Slo(ttft_s=2.0, tpot_s=0.06), max_concurrency=64, resolution=0.0).run()
    for point in result.points:
        for estimate in (point.ttft_s, point.tpot_s):
            assert estimate.samples == point.ok > 0
            assert estimate.low <= estimate.value <= estimate.high
    knee = replica.knee(0.06)
    at_knee = next(p for p in result.points if p.concurrency == knee)  # p95 0.0597 against 0.060: close
    assert at_knee.runs == 3 and at_knee.close and replica.calls.count(knee) == 3
    assert at_knee.verdict == MISSES and result.capacity == knee - 1  # not shown to hold: not sold
    assert at_knee.tpot_s.low <= 0.06 <= at_knee.tpot_s.high
    far = next(p for p in result.points if p.concurrency == 8)
    assert far.runs == 1 and not far.close and far.tpot_s.high < 0.06


def test_a_saturated_server_stops_the_search():
    """A loose SLO never misses; once doubling the concurrency adds no throughput (every
    slot busy) the search stops instead of climbing to its maximum, at the point before."""
    replica = ModelReplica(slots=8, per_seq=0.0)
    result = CapacitySearch(replica, Slo(ttft_s=100.0, tpot_s=10.0), max_concurrency=1024).run()
    assert result.stopped == "saturated"
    assert result.capacity == 8 and result.misses_at is None  # 16 queued behind the 8 slots for nothing
    assert replica.calls == [1, 1, 2, 4, 8, 16]  # 1 twice: its 42 samples bound no p95


def test_refusals_count_against_the_slo():
    replica = ModelReplica(slots=512, per_seq=0.0, refuse_above=20)  # 503s beyond 20 in flight
    result = CapacitySearch(replica, Slo(ttft_s=2.0, tpot_s=0.06), max_concurrency=256, resolution=0.0).run()
    assert (result.capacity, result.misses_at) == (20, 21)
    refused = next(p for p in result.points if p.concurrency == 21)
    assert refused.verdict == MISSES and "answered" in refused.reasons[0]


def test_an_slo_missed_at_the_start_gives_no_capacity():
    replica = ModelReplica()
    result = CapacitySearch(replica, Slo(ttft_s=0.05, tpot_s=None), max_concurrency=64).run()
    assert (result.capacity, result.misses_at, result.stopped) == (0, 1, "missed_at_start")
    assert replica.calls == [1]


def test_the_search_stops_at_its_maximum_when_the_slo_still_holds():
    replica = ModelReplica(slots=512, per_seq=0.0001)
    result = CapacitySearch(replica, Slo(ttft_s=2.0, tpot_s=0.06), start=3, max_concurrency=20).run()
    assert replica.calls == [3, 6, 12, 20]
    assert (result.capacity, result.misses_at, result.stopped) == (20, None, "max_concurrency")


def test_quantile_interval_brackets_the_percentile_by_order_statistics():
    values = [float(v) for v in range(1, 1001)]
    estimate = quantile_interval(values, 95)
    assert estimate.value == pytest.approx(950.05)
    # ranks n*q -/+ 1.96 * sqrt(n*q*(1-q)) = 950 -/+ 13.5
    assert (estimate.low, estimate.high, estimate.samples) == (936.0, 964.0, 1000)
    few = quantile_interval([1.0, 2.0, 3.0, 4.0, 5.0], 95)
    assert few.value == pytest.approx(4.8) and few.high is None  # five samples cannot bound a p95
    assert quantile_interval([], 95).value is None


def test_judge_holds_misses_and_close_from_the_intervals():
    def run(tpots: list[float]):
        records = [RequestRecord(i, 0, "k", 0, 0, 1, 11, None, ttft_s=0.1, e2e_s=0.1 + t * 10, status=200,
                                 outcome="ok", output_tokens=11) for i, t in enumerate(tpots)]  # fmt: skip
        return records, 10.0

    slo = Slo(ttft_s=1.0, tpot_s=0.05)
    assert judge(4, [run([0.01] * 200)], slo).verdict == HOLDS
    assert judge(4, [run([0.09] * 200)], slo).verdict == MISSES
    near = judge(4, [run([0.04] * 185 + [0.06] * 15)], slo)  # 7.5% over the limit: p95 straddles it
    assert near.verdict == CLOSE and near.reasons == ["TPOT p95 60 ms near 50 ms"]
    assert judge(4, [run([0.01] * 5)], slo).verdict == CLOSE  # too few samples to bound a p95
    point = judge(4, [run([0.01] * 100), run([0.01] * 100)], slo)
    assert (point.runs, point.requests, point.requests_per_s, point.goodput_per_s) == (2, 200, 10.0, 10.0)


def test_slo_needs_a_limit_and_sane_shares():
    with pytest.raises(ValueError, match="TTFT or a TPOT"):
        Slo(ttft_s=None, tpot_s=None)
    with pytest.raises(ValueError, match="percentile"):
        Slo(percentile=100)
    with pytest.raises(ValueError, match="answered"):
        Slo(min_ok=0)
