"""The autoscaling replay: our policy and Ray's delay logic on a simulated clock, checked
against decisions worked out by hand."""

from __future__ import annotations

import json

import pytest

from loadtests import cli
from loadtests.replay import (ReplayConfig, compare_targets, diurnal_trace, parse_trace, poisson_trace,
                              recorded_trace, replay, step_trace)  # fmt: skip

# The Ray tier's settings (tests/ray/test_ray_app.py), with a 10 s look-back and 16 units.
CONFIG = ReplayConfig(capacity_units=16, target_utilisation=0.75, min_replicas=1, max_replicas=2, upscale_delay_s=5,
                      downscale_delay_s=20, look_back_period_s=10, metrics_interval_s=1, start_s=30, step_s=0.5)  # fmt: skip


def test_a_step_is_scaled_out_and_back_when_worked_out_by_hand():
    """4 units, then 20 from t=10 to t=100. Reports come every second and are averaged over
    the last 10 s; one replica carries 16 x 0.75 = 12 at target. At t=15 six of the ten
    reports are 20: (6 x 20 + 4 x 4) / 10 = 13.6 > 12 wants 2 (at t=14, 12.0 wants 1); after
    the 5 s upscale delay, 2 at t=20, serving at t=50. From t=104 the average is 12 again
    (wants 1); after the 20 s downscale delay, 1 at t=124."""
    result = replay(step_trace(4, 20, 4, 10, 100), 200, CONFIG)
    assert result.decisions == [(20.0, 1, 2), (124.0, 2, 1)]
    assert result.ready == [(0.0, 1), (50.0, 2), (124.0, 1)]
    # Unmet: 4 units over the 16 one replica carries, from t=10 until the second serves at 50.
    wanted = 4 * 10 + 20 * 90 + 4 * 100
    assert result.attainment == pytest.approx(1 - 4 * 40 / wanted)
    assert result.replica_hours == pytest.approx((200 + (124 - 20)) / 3600)  # the GPU is held from t=20
    assert result.demand_unit_hours == pytest.approx(wanted / 3600) and result.peak_replicas == 2


def test_a_burst_the_look_back_smooths_for_less_than_the_upscale_delay_adds_no_replica():
    """50 units for two reports (t=10, 11): the 10 s average is (2 x 50 + 8 x 4) / 10 = 13.2
    over the 12 one replica carries at target while both are in the window, t=11 to 19: 9 s,
    under a 15 s upscale delay. The same burst twice as long (t=10 to 19) scales out."""
    config = ReplayConfig(**{**CONFIG.__dict__, "upscale_delay_s": 15})
    short = replay(step_trace(4, 50, 4, 10, 12), 120, config)
    assert short.decisions == [] and short.ready == [(0.0, 1)]
    longer = replay(step_trace(4, 50, 4, 10, 20), 120, config)
    assert longer.decisions[0] == (26.0, 1, 2)  # wants 2 from t=11 (13.2 > 12), for 15 s


def test_the_initial_replicas_arrive_with_a_full_window_of_the_demand_before_the_trace():
    """20 units all along (before the trace too): the first report already averages 20 over
    the window, so 2 are wanted from t=0 and decided after exactly the 5 s delay."""
    assert replay(step_trace(20, 20, 20, 0, 0), 30, CONFIG).decisions == [(5.0, 1, 2)]
    # demand from t=0 only: the window holds zeros before it, as Ray's would; at t=6 it is
    # 7 reports of 20 and 3 of 0 (14 > 12): 2 wanted, decided at t=11
    assert replay(recorded_trace([(0.0, 20.0)]), 30, CONFIG).decisions == [(11.0, 1, 2)]


def test_a_higher_target_buys_fewer_replica_hours_with_less_attainment():
    trace = poisson_trace(2.0, 8.0, 4 * 3600, seed=3, swing=0.8, period_s=4 * 3600)  # ~16 units on average
    config = ReplayConfig(capacity_units=8, min_replicas=1, max_replicas=8, upscale_delay_s=30,
                          downscale_delay_s=300, look_back_period_s=30, metrics_interval_s=5, start_s=120, step_s=1)  # fmt: skip
    low, high = compare_targets(trace, 4 * 3600, config, [0.5, 0.9])
    assert low.replica_hours > high.replica_hours
    assert low.attainment > high.attainment
    rebuilt = poisson_trace(2.0, 8.0, 4 * 3600, seed=3, swing=0.8, period_s=4 * 3600)
    again = compare_targets(rebuilt, 4 * 3600, config, [0.5])[0]
    assert (again.decisions, again.attainment) == (low.decisions, low.attainment)  # deterministic
    with pytest.raises(ValueError, match="min_replicas >= 1"):
        replay(trace, 60, ReplayConfig(capacity_units=8, min_replicas=0))


def test_traces(tmp_path):
    assert [step_trace(1, 5, 2, 10, 20)(t) for t in (0, 10, 19.9, 20)] == [1, 5, 5, 2]
    day = diurnal_trace(100, 80)
    assert day(14 * 3600) == pytest.approx(180) and day(2 * 3600) == pytest.approx(20)
    flat = poisson_trace(4.0, 2.0, 2000, seed=1)
    mean = sum(flat(t) for t in range(100, 2000)) / 1900
    assert 6 < mean < 10  # Little's law: 4/s x 2 s = 8 in flight
    assert parse_trace("step:1,5,2,10,20", 100)(15) == 5
    recorded = recorded_trace([(2.0, 6.0), (0.0, 1.0), (5.0, 3.0)])
    assert [recorded(t) for t in (0, 1.9, 2, 4.9, 5, 99)] == [1, 1, 6, 6, 3, 3]
    (tmp_path / "run.json").write_text(json.dumps({"demand_units": [[0, 2], [10, 9]]}))
    assert parse_trace(f"file:{tmp_path / 'run.json'}", 100)(12) == 9
    with pytest.raises(ValueError, match="one of step, diurnal, poisson, file"):
        parse_trace("burst:1", 10)
    with pytest.raises(ValueError, match="takes 5 non-negative numbers"):
        parse_trace("step:1,2", 10)
    with pytest.raises(ValueError, match="swing under 1"):
        parse_trace("poisson:1,2,1.5", 10)


def test_the_cli_prints_a_row_per_target(capsys):
    args = ["replay", "--capacity-file", "16", "--trace", "step:4,20,4,10,100", "--duration-s", "200",
            "--targets", "0.75,0.9", "--max-replicas", "2", "--upscale-delay-s", "5", "--downscale-delay-s", "20",
            "--look-back-period-s", "10", "--metrics-interval-s", "1", "--start-s", "30"]  # fmt: skip
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "| 0.75 | 92.86% | 0.08 | 2 | 2 |" in out
    assert "| 0.9 |" in out
    assert cli.main(["replay", "--capacity-file", "16", "--trace", "step:1"]) == 2
    assert "takes 5 non-negative numbers" in capsys.readouterr().err
