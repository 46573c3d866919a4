"""Load shapes as small typed stages: closed loop, open loop, ramp, sweep.

- Closed loop (``concurrency``): N clients, each sends its next request when the last ends.
- Open loop (``rate``): arrivals at a request rate, Poisson or gamma; ``burstiness`` is the
  gamma shape (1 = Poisson, < 1 burstier, > 1 more regular), as in ``vllm bench serve``.
- Ramp: an open loop whose rate moves linearly from ``rate`` to ``rate_end``.
- Sweep: several stages in a row (rates or concurrencies), one figure set each.
- Streams: several named streams of traffic at once in one stage, each with its own shape
  (a batch flood as a closed loop beside a STAT trickle as an open loop, say), its own key,
  priority class and workload; the stage's duration bounds them all.

Guarantees: arrival times are deterministic per seed; an open loop's arrivals do not wait
for responses (that is the point), optionally capped by ``max_concurrency``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    kind: str  # "concurrency" | "rate" | "ramp" | "streams"
    duration_s: float | None = None
    requests: int | None = None
    concurrency: int | None = None
    rate: float | None = None
    rate_end: float | None = None
    arrival: str = "poisson"  # or "gamma"
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup_s: float = 0.0
    cooldown_s: float = 0.0
    streams: tuple[Stream, ...] = ()  # kind "streams": what runs at once

    def __post_init__(self):
        if self.kind == "streams" and not self.streams:
            raise ValueError("a streams stage needs at least one stream")
        if self.duration_s is None and self.requests is None:
            raise ValueError("a stage needs a duration or a request count")
        if self.kind == "concurrency" and not (self.concurrency and self.concurrency > 0):
            raise ValueError("a closed loop needs concurrency > 0")
        if self.kind in ("rate", "ramp") and not (self.rate and self.rate > 0):
            raise ValueError("an open loop needs rate > 0")
        if self.kind == "ramp" and not (self.rate_end and self.rate_end > 0 and self.duration_s):
            raise ValueError("a ramp needs rate_end > 0 and a duration")
        if self.arrival not in ("poisson", "gamma") or self.burstiness <= 0:
            raise ValueError("arrival must be poisson or gamma, burstiness > 0")
        if self.duration_s is not None and self.warmup_s + self.cooldown_s >= self.duration_s:
            raise ValueError("warm-up plus cool-down must be shorter than the duration")

    @property
    def label(self) -> str:
        if self.kind == "streams":
            return " + ".join(f"{s.name} ({s.shape.label})" for s in self.streams)
        if self.kind == "concurrency":
            return f"concurrency {self.concurrency}"
        if self.kind == "ramp":
            return f"ramp {self.rate:g}->{self.rate_end:g} req/s"
        return f"{self.rate:g} req/s ({self.arrival}{'' if self.arrival == 'poisson' else f', burstiness {self.burstiness:g}'})"

    @property
    def load(self) -> float:
        """The x-axis value of a sweep: concurrency or offered rate."""
        if self.kind == "streams":
            return float(len(self.streams))
        if self.kind == "concurrency":
            return float(self.concurrency)
        if self.kind == "ramp":
            return (self.rate + self.rate_end) / 2
        return float(self.rate)

    def rate_at(self, t: float) -> float:
        if self.kind == "ramp":
            return self.rate + (self.rate_end - self.rate) * min(1.0, t / self.duration_s)
        return self.rate or 0.0

    def offered_requests(self, start_s: float, end_s: float) -> float:
        """Expected arrivals between two times (open loop)."""
        if self.kind == "ramp":
            return (end_s - start_s) * (self.rate_at(start_s) + self.rate_at(end_s)) / 2
        return (end_s - start_s) * (self.rate or 0.0)

    def arrivals(self, seed: int) -> Iterator[float]:
        """Arrival times in seconds from the stage's start (open loop)."""
        rng = random.Random(seed)
        t = 0.0
        sent = 0
        while True:
            rate = max(self.rate_at(t), 1e-9)
            if self.arrival == "gamma":
                gap = rng.gammavariate(self.burstiness, 1.0 / (self.burstiness * rate))
            else:
                gap = rng.expovariate(rate)
            t += gap
            if self.duration_s is not None and t >= self.duration_s:
                return
            if self.requests is not None and sent >= self.requests:
                return
            sent += 1
            yield t


@dataclass(frozen=True)
class Stream:
    """One named stream of a ``streams`` stage: its load shape (``concurrency``, ``rate`` or
    ``ramp``; the stage's duration and windows apply) and the index of its workload."""

    name: str
    shape: Stage
    workload: int = 0

    def __post_init__(self):
        if self.shape.kind == "streams":
            raise ValueError("a stream's shape is a closed or open loop")


def sweep(kind: str, values: list[float], **common) -> list[Stage]:
    if kind == "concurrency":
        return [Stage("concurrency", concurrency=int(v), **common) for v in values]
    return [Stage("rate", rate=float(v), **common) for v in values]


def parse_values(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if not values or any(v <= 0 or math.isnan(v) for v in values):
        raise ValueError(f"expected positive comma-separated numbers, got {text!r}")
    return values
