import random

import pytest

from loadtests.distributions import SpecError, parse


@pytest.mark.parametrize(
    "spec, low, high",
    [("7", 7, 7), ("const:3", 3, 3), ("uniform:2,5", 2, 5), ("normal:50,10,0,80", 0, 80),
     ("lognormal:64,0.5,8,1024", 8, 1024), ("choice:0=0.5,1=0.4,3=0.1", 0, 3)],
)  # fmt: skip
def test_samples_stay_in_range_and_are_deterministic(spec, low, high):
    dist = parse(spec)
    a = [dist.sample(random.Random(1)) for _ in range(3)]
    b = [dist.sample(random.Random(1)) for _ in range(3)]
    assert a == b
    values = [dist.sample(random.Random(i)) for i in range(300)]
    assert all(low <= v <= high and isinstance(v, int) for v in values)


def test_choice_follows_its_weights():
    dist = parse("choice:0=0.8,2=0.2")
    rng = random.Random(0)
    values = [dist.sample(rng) for _ in range(5000)]
    assert set(values) == {0, 2}
    assert 0.75 < values.count(0) / len(values) < 0.85
    assert dist.mean() == pytest.approx(0.4)


def test_lognormal_median_is_its_first_parameter():
    dist = parse("lognormal:100,0.6")
    rng = random.Random(0)
    values = sorted(dist.sample(rng) for _ in range(4001))
    assert 90 <= values[2000] <= 110


@pytest.mark.parametrize("spec", ["", "uniform:5", "uniform:5,2", "normal:-1,2", "poisson:3", "choice:", "choice:a=1", "lognormal:0,1"])
def test_bad_specs_name_themselves(spec):
    with pytest.raises(SpecError, match="distribution"):
        parse(spec)
