"""How many engine replicas MedGemma needs: the cost-unit autoscaling policy for Ray Serve.

Guarantees:
- The signal is demand in concurrency units against engine capacity, both reported by every
  replica's admission layer (``record_autoscaling_stats``): ``demand_units`` = units of the
  requests it is serving + units of the requests waiting in its admission queue;
  ``capacity_units`` = the units its engine runs at once (``max_num_seqs`` of its profile).
  Raw request counts ignore queueing and Ray LLM's default target (1e9 ongoing requests)
  never scales at all.
- The formula (documented in docs/scaling.md and mirrored by the Prometheus recording rule
  ``medgemma:desired_replicas``)::

      desired = ceil( sum(demand_units) / (capacity_units_per_replica * target_utilisation) )

  at least 1 while anything is in flight; Ray Serve then applies min/max replicas and the
  upscale/downscale delays (``_apply_autoscaling_config``), so a short burst does not
  scale up and a short lull does not scale down.
- While replicas start and report nothing yet, the decision keeps the current target:
  a missing report is not read as zero demand.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

logger = logging.getLogger("ray.serve")

DEMAND = "demand_units"
CAPACITY = "capacity_units"


def desired_replicas(demand_units: float, capacity_units_per_replica: float, target_utilisation: float) -> int:
    """Replicas needed so that each runs at ``target_utilisation`` of its capacity."""
    if demand_units <= 0:
        return 0
    per_replica = max(capacity_units_per_replica * target_utilisation, 1e-9)
    return max(1, math.ceil(demand_units / per_replica - 1e-9))


class CostUnitsPolicy:
    """Ray Serve custom autoscaling policy (``AutoscalingPolicy.policy_function``).

    ``capacity_units`` is the fallback per-replica capacity, used until a replica reports
    its own (the engine profile's ``max_num_seqs``)."""

    def __init__(self, target_utilisation: float = 0.75, capacity_units: float = 1.0):
        if not 0 < target_utilisation <= 1:
            raise ValueError("target_utilisation must be in (0, 1]")
        self.target_utilisation = target_utilisation
        self.capacity_units = capacity_units

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        demand = metrics.get(DEMAND) or {}
        capacity = metrics.get(CAPACITY) or {}
        state = dict(ctx.policy_state or {})
        running = set(ctx.running_replicas or ())
        reporting = [replica for replica in running if replica in demand]
        if running and not reporting:  # nobody has reported yet: no news is not zero demand
            return ctx.target_num_replicas, state
        total = sum(demand[replica] for replica in reporting)
        per_replica = statistics.median([capacity[r] for r in reporting if r in capacity] or [self.capacity_units])
        desired = desired_replicas(total, per_replica, self.target_utilisation)
        previous = (state.get("medgemma") or {}).get("desired")
        state["medgemma"] = {"demand_units": total, "capacity_units": per_replica, "desired": desired}
        if desired != previous:  # Ray's controller log then says why it scales
            logger.info("cost-unit policy: %.2f demand units from %d of %d running replicas, %.0f capacity units "
                        "each: wants %d (target %d)", total, len(reporting), len(running), per_replica, desired,
                        ctx.target_num_replicas)  # fmt: skip
        return desired, state
