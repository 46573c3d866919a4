"""Capacity from an SLO: the highest concurrency one replica carries with the SLO holding.

A provider sells concurrency units and a hospital promises a response time; both need the
concurrency at which TTFT and TPOT stay inside the SLO for a given workload. The search:

1. **Bracket.** Closed-loop runs at ``start``, 2x, 4x, ... until the SLO misses, the server
   saturates (throughput grew by less than ``min_gain`` over the last doubling: more
   concurrency only queues, so the capacity is the point before) or ``max_concurrency`` is
   reached.
2. **Bisect** between the highest concurrency that held and the lowest that missed, until
   they are at most ``resolution`` apart (a fraction of the lower one, at least 1).

Guarantees:
- A point's verdict uses the percentile's distribution-free confidence interval (order
  statistics, 95%): it *holds* when every interval lies at or under its limit and at least
  ``min_ok`` of the requests were answered, *misses* when an interval lies wholly above a
  limit or too few were answered, and is *close* otherwise. A close point is measured again
  (``repeats`` more runs, records pooled); still close, it counts as a miss (marked
  ``close``): a unit sold must be one the replica is shown to honour.
- The capacity is the highest concurrency that held; the knee lies between it and the
  lowest that missed (``bracket``), so the answer is within one search step.
- Every point keeps its figures and intervals, so the file shows how sure the answer is.
- Nothing here sends a request: ``measure(concurrency)`` is given (the CLI runs the load
  tester; tests give a latency model), so the search is deterministic under test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from loadtests.client import RequestRecord

Z_95 = 1.96
HOLDS, MISSES, CLOSE = "holds", "misses", "close"


@dataclass(frozen=True)
class Slo:
    """Per-request latency limits at a percentile, and the share of requests that must be
    answered at all (errors, 429s and 503s count against it)."""

    ttft_s: float | None = 2.0
    tpot_s: float | None = 0.06
    percentile: float = 95.0
    min_ok: float = 0.99

    def __post_init__(self):
        if self.ttft_s is None and self.tpot_s is None:
            raise ValueError("an SLO needs a TTFT or a TPOT limit")
        if not 0 < self.percentile < 100:
            raise ValueError("the SLO percentile must lie between 0 and 100")
        if not 0 < self.min_ok <= 1:
            raise ValueError("the share of requests answered must be in (0, 1]")

    def limits(self) -> dict[str, float]:
        return {name: limit for name, limit in (("ttft", self.ttft_s), ("tpot", self.tpot_s)) if limit is not None}


@dataclass(frozen=True)
class Estimate:
    """A percentile of a sample and its 95% confidence interval."""

    value: float | None
    low: float | None
    high: float | None
    samples: int


def quantile_interval(values: list[float], percentile: float, z: float = Z_95) -> Estimate:
    """The percentile (linear interpolation, as ``summary.percentiles``) and a distribution-
    free interval from the order statistics whose ranks bound it with ~95% confidence. With
    too few samples above the percentile the upper bound is the sample's maximum (or None
    when the sample cannot bound it at all): a verdict then needs more samples."""
    if not values:
        return Estimate(None, None, None, 0)
    ordered = sorted(values)
    n, q = len(ordered), percentile / 100
    rank = (n - 1) * q
    below, above = math.floor(rank), math.ceil(rank)
    value = ordered[below] + (ordered[above] - ordered[below]) * (rank - below)
    spread = z * math.sqrt(n * q * (1 - q))
    low_rank, high_rank = math.floor(n * q - spread) - 1, math.ceil(n * q + spread) - 1  # 0-based
    low = ordered[max(low_rank, 0)]
    high = ordered[high_rank] if high_rank <= n - 1 else None
    return Estimate(value, min(low, value), high if high is None else max(high, value), n)


@dataclass
class Point:
    """One concurrency's measurement (every run at it pooled) and its verdict."""

    concurrency: int
    runs: int
    requests: int
    ok: int
    requests_per_s: float  # successful requests per second of window
    goodput_per_s: float  # requests meeting every limit (and answered) per second
    ttft_s: Estimate
    tpot_s: Estimate
    verdict: str
    close: bool = False  # still close after its repeats (then a miss)
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def judge(concurrency: int, runs: list[tuple[list[RequestRecord], float]], slo: Slo) -> Point:
    """The verdict on the pooled windowed records of ``runs`` ((records, window seconds) each)."""
    records = [r for records, _ in runs for r in records if r.in_window]
    window_s = sum(window for _, window in runs) or 1e-9
    ok = [r for r in records if r.outcome == "ok"]
    estimates = {
        "ttft": quantile_interval([r.ttft_s for r in ok if r.ttft_s is not None], slo.percentile),
        "tpot": quantile_interval([r.tpot_s for r in ok if r.tpot_s is not None], slo.percentile),
    }
    limits = slo.limits()
    met = sum(1 for r in ok if all(_within(r, name, limit) for name, limit in limits.items()))
    reasons, unsure = [], []
    answered = len(ok) / len(records) if records else 0.0
    if answered < slo.min_ok:
        reasons.append(f"{answered:.1%} answered, under {slo.min_ok:.1%}")
    for name, limit in limits.items():
        estimate = estimates[name]
        label = f"{name.upper()} p{slo.percentile:g}"
        if estimate.value is None:
            if name == "ttft" or not ok:  # one-token answers have no TPOT: nothing to judge
                reasons.append(f"no {name.upper()} measured")
        elif estimate.low > limit:
            reasons.append(f"{label} {estimate.value * 1e3:.0f} ms over {limit * 1e3:g} ms")
        elif estimate.high is None or estimate.high > limit:
            unsure.append(f"{label} {estimate.value * 1e3:.0f} ms near {limit * 1e3:g} ms")
    verdict = MISSES if reasons else CLOSE if unsure else HOLDS
    return Point(concurrency, len(runs), len(records), len(ok), len(ok) / window_s, met / window_s,
                 estimates["ttft"], estimates["tpot"], verdict, reasons=reasons or unsure)  # fmt: skip


def _within(record: RequestRecord, name: str, limit: float) -> bool:
    value = record.ttft_s if name == "ttft" else record.tpot_s
    if value is None:
        return name == "tpot"  # a one-token answer has no TPOT
    return value <= limit


def decide(point: Point) -> Point:
    """A point still close after its last repeat misses: a unit sold must be one the replica
    is shown to honour, and a percentile whose interval reaches over the limit is not."""
    if point.verdict == CLOSE:
        point.verdict, point.close = MISSES, True
    return point


Measure = Callable[[int], tuple[list[RequestRecord], float]]


@dataclass
class SearchResult:
    capacity: int  # the highest concurrency that held (0: not even ``start``)
    misses_at: int | None  # the lowest that missed (None: none did)
    stopped: str  # bisected | saturated | max_concurrency | missed_at_start
    points: list[Point]
    resolution: int  # the bracket's width when the search ended


class CapacitySearch:
    def __init__(self, measure: Measure, slo: Slo, *, start: int = 1, max_concurrency: int = 256,
                 resolution: float = 0.05, repeats: int = 2, min_gain: float = 0.05,
                 on_point: Callable[[Point], None] | None = None):  # fmt: skip
        if start < 1 or max_concurrency < start:
            raise ValueError("the search needs 1 <= start <= max_concurrency")
        self.measure, self.slo = measure, slo
        self.start, self.max_concurrency = start, max_concurrency
        self.resolution, self.repeats, self.min_gain = resolution, repeats, min_gain
        self.on_point = on_point or (lambda point: None)
        self.points: dict[int, Point] = {}

    def step(self, holds_at: int) -> int:
        """How far apart the bracket may end: ``resolution`` of the lower end, at least 1."""
        return max(1, math.floor(holds_at * self.resolution))

    def evaluate(self, concurrency: int) -> Point:
        runs = [self.measure(concurrency)]
        point = judge(concurrency, runs, self.slo)
        while point.verdict == CLOSE and len(runs) <= self.repeats:
            runs.append(self.measure(concurrency))
            point = judge(concurrency, runs, self.slo)
        point = decide(point)
        self.points[concurrency] = point
        self.on_point(point)
        return point

    def run(self) -> SearchResult:
        holds_at, misses_at, stopped = 0, None, "max_concurrency"
        concurrency, last = self.start, None
        while concurrency <= self.max_concurrency:  # bracket
            point = self.evaluate(concurrency)
            if point.verdict == MISSES:
                misses_at = concurrency
                stopped = "bisected" if holds_at else "missed_at_start"
                break
            if last is not None and point.requests_per_s < last.requests_per_s * (1 + self.min_gain):
                stopped = "saturated"  # more concurrency only queued: sell what reached the throughput
                break
            holds_at, last = concurrency, point
            if concurrency == self.max_concurrency:
                break
            concurrency = min(concurrency * 2, self.max_concurrency)
        if misses_at is not None:  # bisect
            while holds_at and misses_at - holds_at > self.step(holds_at):
                middle = (holds_at + misses_at) // 2
                if self.evaluate(middle).verdict == HOLDS:
                    holds_at = middle
                else:
                    misses_at = middle
        width = (misses_at - holds_at) if misses_at is not None else 0
        return SearchResult(holds_at, misses_at, stopped, sorted(self.points.values(), key=lambda p: p.concurrency),
                            width)  # fmt: skip
