"""What the gate judges: one spec per metric (direction, unit, default tolerance), and tolerances.

``config`` parses ``--regression-tolerance`` with :func:`parse_tolerances`;
the comparison reads each trial's value through its spec's ``extract``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..parsing import share
from ..records.model import Trial


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _pct_of(block: str, pct: str) -> Callable[[Trial], float | None]:
    def get(trial: Trial) -> float | None:
        return _number(getattr(getattr(trial, block, None), pct, None))
    return get


def _field(name: str) -> Callable[[Trial], float | None]:
    def get(trial: Trial) -> float | None:
        return _number(getattr(trial, name, None))
    return get


def _error_rate(trial: Trial) -> float | None:
    if trial.requests > 0:
        return trial.failed / trial.requests
    return _number(trial.error_rate)


@dataclass(frozen=True)
class MetricSpec:
    name: str                # tolerance key: throughput, ttft_p99, ...
    label: str               # what messages call it: output_tok_s, ttft_p99, ...
    unit: str
    higher_is_better: bool
    default_tolerance: float
    extract: Callable[[Trial], float | None]
    absolute: bool = False   # compared by difference (error rate), not by ratio

    def fmt(self, value: float | None) -> str:
        if value is None:
            return "-"
        if self.absolute:
            return f"{value:.2%}"
        if self.unit == "tok/s":
            return f"{value:,.0f}"
        if self.unit == "req/s":
            return f"{value:,.2f} req/s"
        return f"{value:,.1f} {self.unit}" if value < 100 else f"{value:,.0f} {self.unit}"


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("throughput", "output_tok_s", "tok/s", True, 0.05, _field("output_tok_s")),
    MetricSpec("ttft_p50", "ttft_p50", "ms", False, 0.10, _pct_of("ttft_ms", "p50")),
    MetricSpec("ttft_p99", "ttft_p99", "ms", False, 0.10, _pct_of("ttft_ms", "p99")),
    MetricSpec("tpot_p50", "tpot_p50", "ms", False, 0.10, _pct_of("tpot_ms", "p50")),
    MetricSpec("tpot_p99", "tpot_p99", "ms", False, 0.10, _pct_of("tpot_ms", "p99")),
    MetricSpec("error_rate", "error_rate", "", False, 0.0, _error_rate, absolute=True),
)}
# Gated only where the workload has SLOs ([slo]): a closed-loop record without them has nothing to say.
SLO_METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("goodput", "goodput_tok_s", "tok/s", True, 0.05, _field("goodput_tok_s")),
    MetricSpec("max_good_rate", "max_good_rate", "req/s", True, 0.10, _field("max_good_rate")),
)}
ALL_METRICS: dict[str, MetricSpec] = {**METRICS, **SLO_METRICS}
# other spellings accepted by parse_tolerances; "latency" sets all four latency metrics
ALIASES: dict[str, tuple[str, ...]] = {
    "output_tok_s": ("throughput",), "tok_s": ("throughput",), "errors": ("error_rate",),
    "ttft": ("ttft_p50", "ttft_p99"), "tpot": ("tpot_p50", "tpot_p99"),
    "latency": ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"),
}
DEFAULT_TOLERANCES: dict[str, float] = {name: spec.default_tolerance for name, spec in ALL_METRICS.items()}


def _parse_amount(text: str, name: str) -> float:
    raw = text.strip()
    try:
        value = share(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tolerance for {name} must be a percentage like 5% or a fraction "
                                         f"like 0.05, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"tolerance for {name} must be 0 or more, got {text!r}")
    if not raw.endswith("%") and value >= 1:
        raise argparse.ArgumentTypeError(f"tolerance for {name} is {text!r}: write {raw}% for a percentage, "
                                         f"or a fraction below 1 (0.05 = 5%)")
    return value


def parse_tolerances(text: str) -> dict[str, float]:
    """``"throughput=5%,ttft_p99=10%"`` -> every metric's tolerance (unnamed ones keep their default).

    Usable as an argparse ``type=``: bad input raises ``argparse.ArgumentTypeError``.
    Throughput and latency tolerances are relative (5% = a ratio of 0.95 or
    1.05); ``error_rate`` is absolute (``error_rate=0.5%`` allows the error
    rate to rise by half a percentage point).
    """
    out = dict(DEFAULT_TOLERANCES)
    known = ", ".join([*ALL_METRICS, *ALIASES])
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower().replace("-", "_")
        if not sep or not value.strip():
            raise argparse.ArgumentTypeError(f"tolerance must be METRIC=VALUE (e.g. throughput=5%), got {part!r}")
        targets = (name,) if name in ALL_METRICS else ALIASES.get(name)
        if not targets:
            raise argparse.ArgumentTypeError(f"unknown metric {name!r} in tolerance {part!r}; known: {known}")
        amount = _parse_amount(value, name)
        for target in targets:
            if ALL_METRICS[target].higher_is_better and amount >= 1:
                raise argparse.ArgumentTypeError(f"tolerance for {target} must be below 100%, got {value.strip()!r}")
            out[target] = amount
    return out
