"""Autoscaling replay: our cost-unit policy, driven by a demand trace, in simulated time.

To choose ``target_utilisation`` from numbers rather than taste: replay a day of demand
against the policy the Ray deployment runs and count what each target costs (replica-hours)
and what it buys (the share of demand served within the measured capacity).

What runs is the production decision path, not a copy of it:
- ``serving.autoscale.CostUnitsPolicy`` decides from the replicas' reports (demand units,
  capacity units), as Ray Serve calls it;
- Ray Serve's own ``_apply_scaling_factors`` and ``_apply_delay_logic``
  (``ray.serve.autoscaling_policy``, the code ``_apply_autoscaling_config`` wraps custom
  policies with) apply the scaling factors and the upscale/downscale delays, on the
  replay's clock; the result is clamped to min/max replicas as Ray does.

What is modelled:
- Demand is the units wanted in flight at each instant (served or queued), from a trace.
- Every ``metrics_interval_s`` each running replica reports its even share of the demand
  (the router spreads requests) and the capacity; Ray averages each replica's reports over
  ``look_back_period_s``. A replica reports only once it is running; the initial replicas
  were serving before the trace began, so their window starts full of the trace's demand
  at negative times (a recorded trace's samples from before its start, else its first value).
- A replica added at time t serves from ``t + start_s`` (the measured replica start: GPU
  node, model load) and holds its GPU from t. A removed replica stops at once.
- Demand up to ``running replicas x capacity`` is served within the SLO (the capacity is
  the one ``medgemma-loadtest capacity`` measured at it); the rest waits and misses it.
  ``attainment`` is the share of demand (unit-seconds) served within the SLO.

Guarantees: deterministic (a trace's randomness is seeded); the same trace and settings give
the same decisions, at the same simulated instants.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from serving.autoscale import CAPACITY, DEMAND, CostUnitsPolicy

Trace = Callable[[float], float]  # seconds since the start -> demand units


# --- traces ---------------------------------------------------------------------------------
def step_trace(before: float, during: float, after: float, starts_s: float, ends_s: float) -> Trace:
    """``before`` units, ``during`` from ``starts_s``, ``after`` from ``ends_s``."""
    return lambda t: before if t < starts_s else during if t < ends_s else after


def diurnal_trace(mean: float, amplitude: float, period_s: float = 86_400.0, peak_at_s: float = 14 * 3600) -> Trace:
    """A day's sine around ``mean`` (``amplitude`` either way), peaking at ``peak_at_s``."""
    return lambda t: max(0.0, mean + amplitude * math.cos(2 * math.pi * (t - peak_at_s) / period_s))


def poisson_trace(rate_per_s: float, service_s: float, duration_s: float, seed: int = 0, swing: float = 0.0,
                  period_s: float = 86_400.0, peak_at_s: float = 14 * 3600) -> Trace:  # fmt: skip
    """Requests arriving at ``rate_per_s`` (Poisson), each holding one unit for an
    exponential ``service_s`` on average: the units in flight at each instant. With
    ``swing`` (0 to 1) the rate follows a day, ``rate x (1 + swing x cos)`` peaking at
    ``peak_at_s`` (arrivals thinned from the peak rate)."""
    rng = random.Random(seed)
    events: list[tuple[float, int]] = []
    peak_rate = rate_per_s * (1 + swing)
    t = rng.expovariate(peak_rate)
    while t < duration_s:
        rate = rate_per_s * (1 + swing * math.cos(2 * math.pi * (t - peak_at_s) / period_s))
        if rng.random() * peak_rate < rate:
            events += [(t, 1), (t + rng.expovariate(1 / service_s), -1)]
        t += rng.expovariate(peak_rate)
    events.sort()
    points, level = [(0.0, 0.0)], 0
    for at, change in events:
        level += change
        points.append((at, float(level)))
    return recorded_trace(points)


def recorded_trace(points: list[tuple[float, float]]) -> Trace:
    """A measured series of (seconds, units), each value held until the next (0 before the
    first; of points at the same instant, the last given)."""
    ordered = sorted(((float(t), float(v)) for t, v in points), key=lambda point: point[0])
    if not ordered:
        raise ValueError("a recorded trace needs at least one (time, units) point")
    times = [t for t, _ in ordered]

    def demand(at: float) -> float:
        index = bisect.bisect_right(times, at) - 1  # the last point at or before ``at``
        return ordered[index][1] if index >= 0 else 0.0

    return demand


# --- the replay -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplayConfig:
    capacity_units: float  # per replica, at the SLO
    target_utilisation: float = 0.75
    min_replicas: int = 1
    max_replicas: int = 4
    initial_replicas: int | None = None
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 5.0
    start_s: float = 180.0  # a replica's start: added -> serving
    step_s: float = 0.5  # the control loop's period here (Ray's runs every 0.1 s)


@dataclass
class Replica:
    name: str
    added_s: float
    ready_s: float
    reports: deque = field(default_factory=deque)  # (time, demand units)


@dataclass
class ReplayResult:
    config: ReplayConfig
    decisions: list[tuple[float, int, int]]  # (time, from, to)
    ready: list[tuple[float, int]]  # (time, replicas serving) whenever it changes
    attainment: float
    replica_hours: float
    demand_unit_hours: float
    peak_replicas: int


def replay(trace: Trace, duration_s: float, config: ReplayConfig) -> ReplayResult:
    if config.min_replicas < 1:
        raise ValueError("the replay needs min_replicas >= 1: demand is what serving replicas report, and "
                         "with none the policy would never hear of any (scale from zero is Ray's own path)")  # fmt: skip
    from ray.serve.autoscaling_policy import _apply_delay_logic, _apply_scaling_factors
    from ray.serve.config import AutoscalingConfig

    ray_config = AutoscalingConfig(min_replicas=config.min_replicas, max_replicas=config.max_replicas,
                                   upscale_delay_s=config.upscale_delay_s, downscale_delay_s=config.downscale_delay_s,
                                   look_back_period_s=config.look_back_period_s,
                                   metrics_interval_s=config.metrics_interval_s)  # as serving.ray_app gives Ray  # fmt: skip
    policy = CostUnitsPolicy(config.target_utilisation, config.capacity_units)
    initial = config.initial_replicas if config.initial_replicas is not None else config.min_replicas
    replicas = [Replica(f"r{i}", 0.0, 0.0) for i in range(initial)]
    for replica in replicas:  # serving before the trace began: a look-back of its reports already in
        ticks = range(math.ceil(config.look_back_period_s / config.metrics_interval_s) - 1, 0, -1)
        replica.reports.extend((-k * config.metrics_interval_s, trace(-k * config.metrics_interval_s) / initial)
                               for k in ticks)  # fmt: skip
    named = initial
    target, policy_state, ray_state = initial, {}, {}
    decisions, ready_log = [], [(0.0, initial)]
    served = wanted = gpu_s = 0.0
    next_report, peak = 0.0, initial
    for tick in range(int(duration_s / config.step_s)):
        now = tick * config.step_s
        demand = trace(now)
        running = [r for r in replicas if r.ready_s <= now]
        if now >= next_report:  # every running replica reports its share
            for replica in running:
                replica.reports.append((now, demand / len(running)))
                while replica.reports and replica.reports[0][0] <= now - config.look_back_period_s:
                    replica.reports.popleft()
            next_report += config.metrics_interval_s
        reporting = [r for r in running if r.reports]
        ctx = SimpleNamespace(
            aggregated_metrics={DEMAND: {r.name: sum(v for _, v in r.reports) / len(r.reports) for r in reporting},
                                CAPACITY: {r.name: config.capacity_units for r in reporting}},
            policy_state=policy_state, running_replicas=[r.name for r in running], target_num_replicas=target,
        )  # fmt: skip
        desired, policy_state = policy(ctx)
        desired = _apply_scaling_factors(desired, len(replicas), ray_config)
        decided, ray_state = _apply_delay_logic(max(0, desired), target, ray_config, ray_state, _now=now)
        decided = min(max(decided, config.min_replicas), config.max_replicas)
        if decided != target:
            decisions.append((now, target, decided))
            target = decided
        while len(replicas) < target:
            replicas.append(Replica(f"r{named}", now, now + config.start_s))
            named += 1
        while len(replicas) > target:  # the newest first: a starting replica before a serving one
            replicas.pop()
        serving = sum(1 for r in replicas if r.ready_s <= now)
        if serving != ready_log[-1][1]:
            ready_log.append((now, serving))
        peak = max(peak, len(replicas))
        wanted += demand * config.step_s
        served += min(demand, serving * config.capacity_units) * config.step_s
        gpu_s += len(replicas) * config.step_s
    return ReplayResult(config, decisions, ready_log, served / wanted if wanted else 1.0, gpu_s / 3600,
                        wanted / 3600, peak)  # fmt: skip


def parse_trace(spec: str, duration_s: float, seed: int = 0) -> Trace:
    """``step:BEFORE,DURING,AFTER,STARTS_S,ENDS_S``, ``diurnal:MEAN,AMPLITUDE[,PERIOD_S]``,
    ``poisson:RATE_PER_S,SERVICE_S[,SWING]`` (units in flight; seeded) or ``file:PATH`` (a
    recorded series: JSON [[seconds, units], ...])."""
    kind, _, args = spec.partition(":")
    if kind == "file":  # a JSON list of [seconds, units], or an object with one as "demand_units"
        import json
        from pathlib import Path

        data = json.loads(Path(args).read_text())
        return recorded_trace(data["demand_units"] if isinstance(data, dict) else data)
    try:
        values = [float(v) for v in args.split(",")] if args else []
    except ValueError:
        raise ValueError(f"trace {spec!r}: its arguments must be numbers") from None
    shapes = {"step": (5, 5), "diurnal": (2, 3), "poisson": (2, 3)}
    if kind not in shapes:
        raise ValueError(f"trace {spec!r}: the kind must be one of {', '.join(shapes)}, file")
    low, high = shapes[kind]
    if not low <= len(values) <= high or any(v < 0 for v in values):
        raise ValueError(f"trace {spec!r}: {kind} takes {low}{'' if low == high else f'-{high}'} non-negative numbers")
    if kind == "step":
        return step_trace(*values)
    if kind == "diurnal":
        return diurnal_trace(*values)
    if values[0] <= 0 or values[1] <= 0 or (len(values) == 3 and values[2] >= 1):
        raise ValueError(f"trace {spec!r}: rate and service time must be positive, the swing under 1")
    return poisson_trace(values[0], values[1], duration_s, seed, *values[2:])


def compare_targets(trace: Trace, duration_s: float, config: ReplayConfig, targets: list[float]) -> list[ReplayResult]:
    """The same trace replayed at each target utilisation."""
    from dataclasses import replace

    return [replay(trace, duration_s, replace(config, target_utilisation=target)) for target in targets]


def render(results: list[ReplayResult]) -> str:
    lines = ["| target | attainment | replica-hours | peak replicas | scaling decisions |", "| --- | --- | --- | --- | --- |"]
    for result in results:
        lines.append(f"| {result.config.target_utilisation:g} | {result.attainment:.2%} | {result.replica_hours:.2f} | "
                     f"{result.peak_replicas} | {len(result.decisions)} |")  # fmt: skip
    return "\n".join(lines)
