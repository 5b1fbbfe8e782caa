"""How requests arrive: a workload's ``[arrival]`` table.

Closed loop (the default): ``c`` requests in flight, each completion sends
the next. Open loop: requests arrive on a schedule whatever the server does,
at ``rate`` requests/s with ``constant`` gaps, ``poisson`` (exponential gaps)
or ``gamma`` gaps of shape ``burstiness`` (1 is Poisson, below 1 burstier,
above 1 smoother; vLLM's ``--burstiness``), optionally ramped up linearly
over ``ramp_up_s`` and capped at ``max_concurrency`` in flight (a request
that arrives while the cap is full waits in the client; that wait is
reported as client queue time, never inside latency). ``trace``: the
schedule (and each request's lengths) come from a JSONL trace, see
``catalog.trace``. ``rates`` lists the rates of a sweep, one level each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from .datafile import Table

ArrivalKind = Literal["closed", "constant", "poisson", "gamma", "trace"]
KINDS: tuple[str, ...] = ("closed", "constant", "poisson", "gamma", "trace")
OPEN_KINDS = ("constant", "poisson", "gamma")
# The in-flight cap of an open-loop level that names none: high enough never to
# bind on the servers this targets, low enough that a stalled server cannot make
# the client open unbounded connections.
DEFAULT_MAX_CONCURRENCY = 1024
DEFAULT_OPEN_DURATION_S = 20.0
# Fields a test may change per level (``handle.run(64, rate=20)``); they live in the arrival.
LEVEL_FIELDS = ("rate", "arrival_kind", "burstiness", "ramp_up_s", "max_concurrency", "requests", "time_scale")


@dataclass(frozen=True)
class Arrival:
    kind: ArrivalKind = "closed"
    rate: float | None = None           # requests/s of one open-loop level
    rates: tuple[float, ...] = ()       # a sweep's levels (requests/s)
    burstiness: float = 1.0             # gamma shape
    ramp_up_s: float = 0.0              # the rate rises linearly from 0 over this long
    max_concurrency: int | None = None  # open loop: in-flight cap (None: DEFAULT_MAX_CONCURRENCY)
    requests: int | None = None         # open loop: requests per level (else rate x duration_s)
    duration_s: float = DEFAULT_OPEN_DURATION_S
    trace: Path | None = None           # kind = "trace": the JSONL file
    time_scale: float = 1.0             # trace: its timestamps are multiplied by this (0.5 = twice as fast)

    @property
    def open(self) -> bool:
        return self.kind != "closed"

    @property
    def cap(self) -> int:
        return self.max_concurrency or DEFAULT_MAX_CONCURRENCY

    def requests_at(self, rate: float) -> int:
        """Requests an open-loop level sends at ``rate``: the fixed count, else rate x duration."""
        if self.requests is not None:
            return self.requests
        return max(1, math.ceil(rate * self.duration_s))

    def level(self, source: str, **changes: object) -> Arrival:
        """This arrival with per-level changes (``rate=20``; ``arrival_kind`` names ``kind``)."""
        if "arrival_kind" in changes:
            changes["kind"] = changes.pop("arrival_kind")
        out = replace(self, **changes)  # type: ignore[arg-type]
        out.check(source)
        return out

    def check(self, source: str) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"arrival kind must be one of {', '.join(KINDS)}, not {self.kind!r}",
                              source=source, field="arrival.kind")
        if self.rate is not None and not (isinstance(self.rate, (int, float)) and self.rate > 0):
            raise ConfigError(f"rate must be a positive number of requests/s, not {self.rate!r}",
                              source=source, field="arrival.rate")
        if self.kind == "closed" and self.rate is not None:
            raise ConfigError(f"rate {self.rate:g} needs an open-loop arrival; this one is a closed loop "
                              "(give arrival_kind='poisson', 'constant' or 'gamma')", source=source, field="arrival.rate")
        if self.burstiness <= 0:
            raise ConfigError(f"burstiness must be positive, not {self.burstiness!r}", source=source,
                              field="arrival.burstiness")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, not {self.max_concurrency!r}",
                              source=source, field="arrival.max_concurrency")

    def check_level(self, workload: str, source: str) -> None:
        """A level about to run: an open-loop rate process needs its rate (a sweep gives one per level)."""
        if self.kind in OPEN_KINDS and self.rate is None:
            sweep = f" (its sweep: {', '.join(f'{r:g}' for r in self.rates)} req/s)" if self.rates else ""
            raise ConfigError(f"workload {workload} arrives open-loop ({self.kind}) and this level names no rate"
                              f"{sweep}: give rate=R, or set arrival.rate", source=source, field="arrival.rate")

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "rate": self.rate, "rates": list(self.rates), "burstiness": self.burstiness,
                "ramp_up_s": self.ramp_up_s, "max_concurrency": self.max_concurrency, "requests": self.requests,
                "duration_s": self.duration_s, "trace": str(self.trace) if self.trace else None,
                "time_scale": self.time_scale}


CLOSED = Arrival()


def _rates(t: Table) -> tuple[float, ...]:
    value = t.raw("rates", [])
    if not isinstance(value, list):
        raise t.error("rates", f"must be an array of positive numbers (requests/s), got {value!r}")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not item > 0 or not math.isfinite(item):
            raise t.error("rates", f"must hold positive numbers (requests/s) only, got {item!r}")
        out.append(float(item))
    if len(set(out)) != len(out):
        raise t.error("rates", f"has duplicate values: {value!r}")
    return tuple(sorted(out))


def parse_arrival(t: Table, folder: Path) -> Arrival:
    """The ``[arrival]`` table (``t``); ``folder``: where a relative trace path starts."""
    kind = t.string("kind", "closed", choices=KINDS)
    if kind == "closed":
        t.finish()      # nothing else means anything for a closed loop
        return CLOSED
    trace = None
    if kind == "trace":
        raw = t.string("trace")
        trace = Path(raw) if Path(raw).is_absolute() else folder / raw
        if not trace.is_file():
            raise t.error("trace", f"no such trace file: {trace}")
        from .trace import load_trace
        load_trace(trace)       # a malformed line stops the run here, before anything boots
    arrival = Arrival(
        kind=kind,
        rate=t.number("rate", None, minimum=0.0, exclusive_min=True) if kind != "trace" else None,
        rates=_rates(t) if kind != "trace" else (),
        burstiness=t.number("burstiness", 1.0, minimum=0.0, exclusive_min=True) if kind == "gamma" else 1.0,
        ramp_up_s=t.number("ramp_up_s", 0.0, minimum=0.0) if kind != "trace" else 0.0,
        max_concurrency=t.integer("max_concurrency", None, minimum=1),
        requests=t.integer("requests", None, minimum=1),
        duration_s=t.number("duration_s", DEFAULT_OPEN_DURATION_S, minimum=0.0, exclusive_min=True)
        if kind != "trace" else DEFAULT_OPEN_DURATION_S,
        trace=trace,
        time_scale=t.number("time_scale", 1.0, minimum=0.0, exclusive_min=True) if kind == "trace" else 1.0,
    )
    t.finish()
    if arrival.requests is not None and t.has("duration_s"):
        raise t.error("duration_s", "give requests or duration_s, not both")
    return arrival
