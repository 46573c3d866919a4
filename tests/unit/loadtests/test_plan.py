"""``medgemma-loadtest plan``: the fleet arithmetic, what counts as sold, and the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from loadtests import cli
from loadtests.plan import fleet_plan, sold_units_in, units_from_capacity
from serving.autoscale import CostUnitsPolicy
from serving.layers import SettingsError


def test_the_plan_for_a_known_case():
    plan = fleet_plan(40, 500, peak_utilisation=0.6, trough_utilisation=0.1, gpu_hour_price=2.5)
    assert plan.peak_demand_units == 300
    assert plan.replicas_at_peak == 10  # 300 / (40 x 0.75) = 10 exactly
    assert (plan.min_replicas, plan.max_replicas) == (2, 17)  # 50 / 30 -> 2; 500 / 30 = 16.7 -> 17
    assert plan.headroom_units_at_peak == 100 and plan.headroom_share_at_peak == pytest.approx(1 / 3)
    assert plan.cost_per_hour == {"min_replicas": 5.0, "peak": 25.0, "max_replicas": 42.5}
    assert plan.cost_per_sold_unit_hour == pytest.approx(25.0 / 500)


@pytest.mark.parametrize("sold, peak, target", [(500, 0.6, 0.75), (7, 1.0, 0.5), (1000, 0.33, 0.9), (64, 0.1, 1.0)])
def test_replicas_at_peak_are_what_the_autoscaling_policy_would_ask_for(sold, peak, target):
    plan = fleet_plan(24, sold, peak_utilisation=peak, target_utilisation=target)
    ctx = SimpleNamespace(aggregated_metrics={"demand_units": {"r1": sold * peak}, "capacity_units": {"r1": 24.0}},
                          policy_state={}, running_replicas=["r1"], target_num_replicas=1)  # fmt: skip
    decided, _ = CostUnitsPolicy(target_utilisation=target)(ctx)
    assert plan.replicas_at_peak == decided
    assert plan.replicas_at_peak * 24 * target >= sold * peak > (plan.replicas_at_peak - 1) * 24 * target
    assert 1 <= plan.min_replicas <= plan.replicas_at_peak <= plan.max_replicas


def test_without_a_price_there_are_no_costs_and_nothing_sold_is_refused():
    plan = fleet_plan(16, 16, peak_utilisation=1.0)
    assert (plan.replicas_at_peak, plan.min_replicas, plan.max_replicas) == (2, 1, 2)  # 16 / 12 -> 2
    assert plan.cost_per_hour is None and plan.cost_per_sold_unit_hour is None
    with pytest.raises(SettingsError, match="nothing is sold"):
        fleet_plan(16, 0, peak_utilisation=0.5)
    with pytest.raises(SettingsError, match="at least 1 unit"):
        fleet_plan(0, 10, peak_utilisation=0.5)
    with pytest.raises(SettingsError, match="trough <= peak"):
        fleet_plan(16, 10, peak_utilisation=0.3, trough_utilisation=0.5)


def test_units_sold_are_the_active_accounts_plans(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({
        "plans": {"clinic": {"concurrency": 8}, "starter": {"concurrency": 2}},
        "accounts": {"st-marys": {"plan": "clinic"}, "north": {"plan": "clinic"}, "gp": {"plan": "starter"},
                     "gone": {"plan": "clinic", "suspended": True}},
    }))  # fmt: skip
    assert sold_units_in(str(keys)) == 18


def test_units_come_from_a_capacity_file_or_a_number(tmp_path):
    path = tmp_path / "capacity.json"
    path.write_text(json.dumps({"format": 1, "units_per_replica": 12, "engine": {"profile": "l4"}, "slo": {"ttft_ms": 2000}}))
    assert units_from_capacity(str(path)) == (12, {"engine": {"profile": "l4"}, "slo": {"ttft_ms": 2000}, "workload": None})
    assert units_from_capacity("30") == (30, {})
    path.write_text("{}")
    with pytest.raises(SettingsError, match="not a capacity file"):
        units_from_capacity(str(path))


def test_the_cli_prints_the_ray_settings_and_json(tmp_path, capsys):
    path = tmp_path / "capacity.json"
    path.write_text(json.dumps({"format": 1, "units_per_replica": 40, "engine": {"profile": "h100", "vllm_version": "0.32.0"},
                                "slo": {"ttft_ms": 2000.0, "tpot_ms": 60.0, "percentile": 95.0}}))  # fmt: skip
    args = ["plan", "--capacity-file", str(path), "--sold-units", "500", "--peak-utilisation", "0.6",
            "--trough-utilisation", "0.1", "--gpu-hour-price", "2.5"]  # fmt: skip
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "measured on h100 (vLLM 0.32.0) at TTFT p95 <= 2000.0 ms" in text
    assert "replicas at peak: 10" in text and "min_replicas: 2" in text and "max_replicas: 17" in text
    assert "cost per sold unit: 0.0500 per hour at peak" in text
    assert cli.main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["replicas_at_peak"], doc["max_replicas"], doc["measured"]["engine"]["profile"]) == (10, 17, "h100")
    assert cli.main(["plan", "--capacity-file", str(tmp_path / "none.json"), "--sold-units", "5"]) == 2
    assert f"{tmp_path / 'none.json'} does not exist" in capsys.readouterr().err  # the server's own reader
