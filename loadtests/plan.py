"""How many replicas a fleet needs: from a measured capacity and what is sold.

Inputs: units one replica carries within the SLO (``capacity.json`` from
``medgemma-loadtest capacity``, or a number), the units sold (the sum of every active
account's plan in a keys file, or a number), the share of sold units expected in use at peak
and at the quietest hour, and the autoscaler's target utilisation (Ray's
``target_utilisation``, 0.75 by default).

Guarantees:
- Replica counts come from ``serving.autoscale.desired_replicas``, the function the Ray
  autoscaling policy runs, so the plan and the autoscaler agree on the arithmetic:
  ``ceil(demand units / (capacity x target))``.
- ``max_replicas`` carries every sold unit at once at the target utilisation: an account's
  budget caps its units in flight (queued for the engine or running). Requests waiting in a
  plan's own queue beyond its budget (``queue:`` in the keys file) count as demand too, so
  with such plans the autoscaler may ask for more; ``max_replicas`` then caps it, and those
  requests wait their plan's turn rather than the fleet's.
- ``min_replicas`` carries the quietest hour's demand, and is at least 1 (scale to zero
  makes the first request wait minutes for a GPU and a model load).
- Headroom is what the peak's replicas carry beyond the peak's demand, at full capacity.
- Cost per sold unit is the peak's GPU-hours divided by the units sold; the fleet's cost
  per hour is given at the quietest hour, at peak and at max_replicas.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from serving.admission.keys import KeyStore
from serving.autoscale import desired_replicas
from serving.capacity import load_capacity_file
from serving.layers import SettingsError

DEFAULT_TARGET_UTILISATION = 0.75  # serving.ray_app.ScalingSettings.target_utilisation's default


@dataclass(frozen=True)
class FleetPlan:
    units_per_replica: int
    sold_units: int
    peak_utilisation: float
    trough_utilisation: float
    target_utilisation: float
    peak_demand_units: float
    replicas_at_peak: int
    min_replicas: int
    max_replicas: int
    headroom_units_at_peak: float  # what the peak's replicas carry beyond its demand, at full capacity
    headroom_share_at_peak: float  # of the peak's demand
    gpus_per_replica: int
    gpu_hour_price: float | None
    cost_per_hour: dict[str, float] | None  # min_replicas, peak, max_replicas
    cost_per_sold_unit_hour: float | None  # at peak

    def to_json(self) -> dict:
        return asdict(self)


def fleet_plan(units_per_replica: int, sold_units: int, *, peak_utilisation: float, trough_utilisation: float = 0.0,
               target_utilisation: float = DEFAULT_TARGET_UTILISATION, gpus_per_replica: int = 1,
               gpu_hour_price: float | None = None) -> FleetPlan:  # fmt: skip
    if units_per_replica < 1:
        raise SettingsError("a replica must carry at least 1 unit (the capacity file holds no capacity)")
    if sold_units < 1:
        raise SettingsError("nothing is sold: give --sold-units or a keys file with active accounts")
    if not 0 < peak_utilisation <= 1 or not 0 <= trough_utilisation <= peak_utilisation:
        raise SettingsError("utilisations must satisfy 0 <= trough <= peak <= 1 and peak > 0")
    if not 0 < target_utilisation <= 1:
        raise SettingsError("target_utilisation must be in (0, 1]")
    peak_demand = sold_units * peak_utilisation
    at_peak = desired_replicas(peak_demand, units_per_replica, target_utilisation)
    lowest = max(1, desired_replicas(sold_units * trough_utilisation, units_per_replica, target_utilisation))
    highest = desired_replicas(sold_units, units_per_replica, target_utilisation)
    headroom = at_peak * units_per_replica - peak_demand
    costs = per_unit = None
    if gpu_hour_price is not None:
        hourly = gpus_per_replica * gpu_hour_price
        costs = {"min_replicas": lowest * hourly, "peak": at_peak * hourly, "max_replicas": highest * hourly}
        per_unit = at_peak * hourly / sold_units
    return FleetPlan(units_per_replica, sold_units, peak_utilisation, trough_utilisation, target_utilisation,
                     peak_demand, at_peak, lowest, highest, headroom, headroom / peak_demand, gpus_per_replica,
                     gpu_hour_price, costs, per_unit)  # fmt: skip


def units_from_capacity(value: str) -> tuple[int, dict]:
    """Units per replica from a number or a capacity file, and what the file says it was
    measured on (empty for a number)."""
    if value.strip().isdigit():
        return int(value), {}
    doc = load_capacity_file(Path(value))
    return doc["units_per_replica"], {"engine": doc.get("engine"), "slo": doc.get("slo"), "workload": doc.get("workload")}


def sold_units_in(keys_file: str) -> int:
    """Units sold: every active (not suspended) account's plan concurrency."""
    store = KeyStore.load(keys_file)
    return sum(account.plan.concurrency for name, account in store.accounts.items() if name not in store.suspended)


def render(plan: FleetPlan, measured: dict) -> str:
    lines = []
    engine = measured.get("engine") or {}
    if engine:
        slo = measured.get("slo") or {}
        lines.append(f"capacity: {plan.units_per_replica} units per replica, measured on {engine.get('profile')} "
                     f"(vLLM {engine.get('vllm_version')}) at TTFT p{slo.get('percentile', 95):g} <= "
                     f"{slo.get('ttft_ms')} ms, TPOT <= {slo.get('tpot_ms')} ms")  # fmt: skip
    else:
        lines.append(f"capacity: {plan.units_per_replica} units per replica (given)")
    lines += [
        f"sold: {plan.sold_units} units; at peak {plan.peak_utilisation:.0%} in use = {plan.peak_demand_units:g} units",
        f"replicas at peak: {plan.replicas_at_peak} (each at target utilisation {plan.target_utilisation:.0%})",
        f"headroom at peak: {plan.headroom_units_at_peak:g} units ({plan.headroom_share_at_peak:.0%} of the peak's demand)",
        "Ray Serve autoscaling settings (medgemma-serve ray / deploy/rayservice):",
        f"  min_replicas: {plan.min_replicas}      # the quietest hour: {plan.trough_utilisation:.0%} of sold units",
        f"  max_replicas: {plan.max_replicas}      # every sold unit in use at once",
        f"  target_utilisation: {plan.target_utilisation:g}",
    ]
    if plan.cost_per_hour is not None:
        c = plan.cost_per_hour
        lines.append(f"cost per hour: {c['min_replicas']:.2f} quietest, {c['peak']:.2f} at peak, "
                     f"{c['max_replicas']:.2f} at max_replicas ({plan.gpus_per_replica} GPU(s) per replica "
                     f"at {plan.gpu_hour_price:g} per GPU-hour)")  # fmt: skip
        lines.append(f"cost per sold unit: {plan.cost_per_sold_unit_hour:.4f} per hour at peak "
                     f"({plan.cost_per_sold_unit_hour * 730:.2f} per 730-hour month)")  # fmt: skip
    return "\n".join(lines)
