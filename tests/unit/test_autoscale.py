"""The cost-unit autoscaling policy and the Ray app's settings (no Ray cluster needed)."""

from types import SimpleNamespace

import pytest

from serving.autoscale import CAPACITY, DEMAND, CostUnitsPolicy, desired_replicas


@pytest.mark.parametrize(
    "demand, capacity, target, expected",
    [(0, 16, 0.75, 0), (1, 16, 0.75, 1), (12, 16, 0.75, 1), (13, 16, 0.75, 2), (24, 16, 0.75, 2),
     (25, 16, 0.75, 3), (16, 16, 1.0, 1), (17, 16, 1.0, 2), (100, 64, 0.5, 4)],
)  # fmt: skip
def test_desired_replicas_is_demand_over_target_capacity_rounded_up(demand, capacity, target, expected):
    assert desired_replicas(demand, capacity, target) == expected


def ctx(demand: dict, capacity: dict, running=None, target=1):
    return SimpleNamespace(
        aggregated_metrics={DEMAND: demand, CAPACITY: capacity},
        running_replicas=list(running if running is not None else demand),
        target_num_replicas=target, policy_state={},
    )  # fmt: skip


def test_policy_sums_demand_over_replicas_and_uses_their_reported_capacity():
    policy = CostUnitsPolicy(target_utilisation=0.75, capacity_units=64)
    desired, state = policy(ctx({"r1": 10.0, "r2": 9.0}, {"r1": 16.0, "r2": 16.0}, target=2))
    assert desired == 2 and state["medgemma"] == {"demand_units": 19.0, "capacity_units": 16.0, "desired": 2}
    desired, _ = policy(ctx({"r1": 16.0, "r2": 14.0}, {"r1": 16.0, "r2": 16.0}, target=2))
    assert desired == 3  # 30 units / (16 x 0.75) = 2.5


def test_policy_scales_to_what_ray_bounds_when_idle_and_holds_while_nobody_reported():
    policy = CostUnitsPolicy(target_utilisation=0.75, capacity_units=16)
    assert policy(ctx({"r1": 0.0}, {"r1": 16.0}, target=2))[0] == 0  # Ray applies min_replicas
    # Two replicas just started and have not reported: keep the current target, not zero.
    assert policy(ctx({}, {}, running=["r1", "r2"], target=2))[0] == 2
    # One reported: the fallback capacity stands in only where none was reported.
    assert policy(ctx({"r1": 20.0}, {}, running=["r1", "r2"], target=2))[0] == 2


def test_target_utilisation_must_be_a_share():
    with pytest.raises(ValueError):
        CostUnitsPolicy(target_utilisation=0)
    with pytest.raises(ValueError):
        CostUnitsPolicy(target_utilisation=1.5)
