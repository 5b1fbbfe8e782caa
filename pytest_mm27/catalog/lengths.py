"""Request lengths: fixed, uniform, normal or lognormal within bounds.

A length is drawn per request index from a hash of (seed, stream, index),
not from a shared RNG, so any process (a sharded worker, a retry) gets the
same length for the same request without coordination, and drawing costs a
few microseconds in the refill path. Bounded normals and lognormals are
sampled by inverting the CDF over [min, max] (a truncated distribution, no
pile-up of mass at the bounds as clamping would give).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

from .datafile import Table

Kind = Literal["fixed", "uniform", "normal", "lognormal"]
KINDS = ("fixed", "uniform", "normal", "lognormal")
_STD = NormalDist()
_MASK = (1 << 64) - 1


def unit(seed: int, stream: int, index: int) -> float:
    """A uniform number in (0, 1) from splitmix64 of (seed, stream, index)."""
    z = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB + 1) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return ((z >> 11) + 0.5) / (1 << 53)


@dataclass(frozen=True)
class Lengths:
    """How many tokens a request has (its prompt or its output)."""

    kind: Kind
    mean: float             # fixed: the length; uniform: the midpoint
    stddev: float = 0.0     # normal/lognormal: of the lengths themselves, in tokens
    minimum: int = 1
    maximum: int = 1

    @classmethod
    def fixed(cls, n: int) -> Lengths:
        return cls("fixed", float(n), 0.0, n, n)

    @property
    def is_fixed(self) -> bool:
        return self.kind == "fixed"

    @property
    def nominal(self) -> int:
        """One length that stands for the distribution (its mean, clipped to the bounds):
        what single-number consumers (the simulator's predictions, record headers) see."""
        return max(self.minimum, min(self.maximum, round(self.mean)))

    def draw(self, seed: int, stream: int, index: int) -> int:
        if self.kind == "fixed":
            return self.minimum
        u = unit(seed, stream, index)
        lo, hi = self.minimum, self.maximum
        if self.kind == "uniform":
            return min(hi, lo + int(u * (hi - lo + 1)))
        if self.kind == "normal":
            dist, a, b = NormalDist(self.mean, self.stddev), lo - 0.5, hi + 0.5
        else:
            # mean/stddev of the lengths -> mu/sigma of their logarithm
            s2 = math.log1p((self.stddev / self.mean) ** 2)
            dist = NormalDist(math.log(self.mean) - s2 / 2, math.sqrt(s2))
            a, b = math.log(max(lo - 0.5, 1e-9)), math.log(hi + 0.5)
        fa, fb = dist.cdf(a), dist.cdf(b)
        p = fa + u * (fb - fa)
        p = min(max(p, 1e-12), 1 - 1e-12)
        x = dist.inv_cdf(p)
        if self.kind == "lognormal":
            x = math.exp(x)
        return max(lo, min(hi, round(x)))

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.minimum)
        if self.kind == "uniform":
            return f"uniform {self.minimum}..{self.maximum}"
        return f"{self.kind} mean {self.mean:g} sd {self.stddev:g} in {self.minimum}..{self.maximum}"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "fixed":
            return {"dist": "fixed", "tokens": self.minimum}
        out: dict[str, Any] = {"dist": self.kind, "min": self.minimum, "max": self.maximum}
        if self.kind != "uniform":
            out.update(mean=self.mean, stddev=self.stddev)
        return out


def parse_lengths(t: Table, key: str, default: object = None) -> Lengths | None:
    """``key = 256`` (fixed) or ``key = { dist = "...", ... }``; None if absent and no default."""
    if not t.has(key):
        if default is None:
            t.raw(key)  # raises "is required"
        return default  # type: ignore[return-value]
    value = t.raw(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return Lengths.fixed(t.integer(key))
    if not isinstance(value, dict):
        raise t.error(key, f"must be an integer, or a table like {{ dist = \"uniform\", min = 64, max = 512 }}, "
                           f"got {value!r}")
    d = t.table(key)
    kind = d.string("dist", choices=KINDS)
    if kind == "fixed":
        n = d.integer("tokens")
        d.finish()
        return Lengths.fixed(n)
    lo = d.integer("min", 1)
    hi = d.integer("max")
    if lo > hi:
        raise d.error("min", f"{lo} is above max {hi}")
    if kind == "uniform":
        d.finish()
        return Lengths("uniform", (lo + hi) / 2, 0.0, lo, hi)
    mean = d.number("mean", minimum=0.0, exclusive_min=True)
    sd = d.number("stddev", minimum=0.0, exclusive_min=True)
    d.finish()
    if not lo <= mean <= hi:
        raise d.error("mean", f"{mean:g} is outside min..max ({lo}..{hi})")
    return Lengths(kind, mean, sd, lo, hi)  # type: ignore[arg-type]
