"""Number distributions for workloads, written as short specs.

A spec is a constant (``256``), or ``kind:params``:
- ``const:N``
- ``uniform:LOW,HIGH`` (integers, both ends included)
- ``normal:MEAN,SD[,MIN,MAX]`` (rounded, clipped to MIN..MAX, default 0..inf)
- ``lognormal:MEDIAN,SIGMA[,MIN,MAX]`` (long right tail, like real prompt lengths)
- ``choice:V1=W1,V2=W2,...`` (weighted discrete values, for example image counts
  ``choice:0=0.5,1=0.4,2=0.1``)

Guarantees: a spec is validated when parsed (a bad one names itself in the error); every
sample is a non-negative int; sampling is deterministic for a given ``random.Random``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


class SpecError(ValueError):
    """A distribution spec that cannot be parsed."""


@dataclass(frozen=True)
class Distribution:
    kind: str
    params: tuple[float, ...]
    values: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    spec: str = ""

    def sample(self, rng: random.Random) -> int:
        if self.kind == "const":
            return int(self.params[0])
        if self.kind == "uniform":
            return rng.randint(int(self.params[0]), int(self.params[1]))
        if self.kind == "choice":
            return rng.choices(self.values, self.weights)[0]
        low, high = self.params[2], self.params[3]
        if self.kind == "normal":
            value = rng.gauss(self.params[0], self.params[1])
        else:  # lognormal: params are the median and sigma of log(value)
            value = rng.lognormvariate(math.log(self.params[0]), self.params[1])
        return int(min(high, max(low, round(value))))

    def mean(self) -> float:
        """The expected value (before clipping for normal/lognormal)."""
        if self.kind == "const":
            return self.params[0]
        if self.kind == "uniform":
            return (self.params[0] + self.params[1]) / 2
        if self.kind == "choice":
            return sum(v * w for v, w in zip(self.values, self.weights)) / sum(self.weights)
        if self.kind == "normal":
            return self.params[0]
        return self.params[0] * math.exp(self.params[1] ** 2 / 2)

    def maximum(self) -> float:
        if self.kind == "const":
            return self.params[0]
        if self.kind == "uniform":
            return self.params[1]
        if self.kind == "choice":
            return max(self.values)
        return self.params[3]

    def __str__(self) -> str:
        return self.spec


def parse(spec: str | int | float) -> Distribution:
    text = str(spec).strip()
    kind, _, rest = text.partition(":")
    if not rest:
        kind, rest = "const", text
    try:
        if kind == "choice":
            pairs = [item.split("=") for item in rest.split(",") if item.strip()]
            values = tuple(int(v) for v, _ in pairs)
            weights = tuple(float(w) for _, w in pairs)
            if not values or any(v < 0 for v in values) or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError
            return Distribution("choice", (), values, weights, text)
        numbers = tuple(float(x) for x in rest.split(","))
    except ValueError:
        raise SpecError(f"cannot parse distribution {text!r}") from None
    arity = {"const": (1,), "uniform": (2,), "normal": (2, 4), "lognormal": (2, 4)}
    if kind not in arity or len(numbers) not in arity[kind]:
        raise SpecError(
            f"distribution {text!r}: expected const:N, uniform:LOW,HIGH, normal:MEAN,SD[,MIN,MAX], "
            "lognormal:MEDIAN,SIGMA[,MIN,MAX] or choice:V=W,..."
        )
    if kind in ("normal", "lognormal") and len(numbers) == 2:
        numbers = (*numbers, 0.0, math.inf)
    if any(n < 0 for n in numbers) or (kind == "uniform" and numbers[0] > numbers[1]):
        raise SpecError(f"distribution {text!r}: values must be non-negative and ordered")
    if kind == "lognormal" and numbers[0] <= 0:
        raise SpecError(f"distribution {text!r}: the median must be positive")
    return Distribution(kind, numbers, spec=text)
