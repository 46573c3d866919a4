import statistics

import pytest

from loadtests.profiles import Stage, parse_values, sweep


def test_poisson_arrivals_match_the_rate():
    stage = Stage("rate", rate=20, duration_s=200)
    times = list(stage.arrivals(seed=3))
    assert 20 * 200 * 0.95 < len(times) < 20 * 200 * 1.05
    assert times == sorted(times) and times[-1] < 200
    assert list(stage.arrivals(seed=3)) == times  # deterministic


def test_burstiness_changes_the_spread_not_the_rate():
    def gaps(burstiness):
        times = list(Stage("rate", rate=10, duration_s=500, arrival="gamma", burstiness=burstiness).arrivals(1))
        g = [b - a for a, b in zip(times, times[1:])]
        return len(times) / 500, statistics.pstdev(g) / statistics.mean(g)

    rate_bursty, cv_bursty = gaps(0.25)
    rate_regular, cv_regular = gaps(4.0)
    assert rate_bursty == pytest.approx(10, rel=0.15) and rate_regular == pytest.approx(10, rel=0.1)
    assert cv_bursty > 1.5 > 0.7 > cv_regular  # gamma CV = 1/sqrt(shape)


def test_ramp_rate_rises_linearly():
    stage = Stage("ramp", rate=2, rate_end=20, duration_s=100)
    times = list(stage.arrivals(0))
    first, last = sum(t < 20 for t in times), sum(t >= 80 for t in times)
    assert last > 3 * first
    assert stage.offered_requests(0, 100) == pytest.approx(1100)


def test_request_bound_and_labels():
    assert len(list(Stage("rate", rate=50, requests=7).arrivals(0))) == 7
    stages = sweep("concurrency", parse_values("1,4"), duration_s=10)
    assert [s.label for s in stages] == ["concurrency 1", "concurrency 4"]
    assert [s.load for s in stages] == [1.0, 4.0]


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="rate", duration_s=10), dict(kind="concurrency", duration_s=10),
     dict(kind="rate", rate=1), dict(kind="ramp", rate=1, duration_s=10),
     dict(kind="rate", rate=1, duration_s=10, warmup_s=6, cooldown_s=5)],
)  # fmt: skip
def test_invalid_stages_are_refused(kwargs):
    with pytest.raises(ValueError):
        Stage(**kwargs)
