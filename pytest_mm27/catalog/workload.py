"""Workloads: the request shape and how many requests make one level."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from .arrivals import CLOSED, LEVEL_FIELDS, Arrival, parse_arrival
from .datafile import Table, read_toml
from .datasets import Dataset, parse_dataset
from .lengths import Lengths, parse_lengths
from .traffic import PrefixSpec, SessionSpec, parse_prefix, parse_sessions
from ..errors import ConfigError
from .slo import SloSpec, parse_slo
from .topology import Catalog, load_catalog_files

Api = Literal["completions", "chat"]
Measure = Literal["steady", "count"]

# Steady-level defaults (see loadgen.steady); --precision and --max-window override them.
DEFAULT_PRECISION = 0.01
DEFAULT_MIN_WINDOW_S = 5.0
DEFAULT_MAX_WINDOW_S = 60.0
# Keys that only mean something in one measuring mode: a workload that sets one
# under the other mode is refused, so a file never says what it does not do.
_COUNT_ONLY = ("requests_per_concurrency", "min_requests", "warmup_requests")
_STEADY_ONLY = ("window_s", "min_window_s", "max_window_s", "precision", "warmup_s")


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    source: Path
    input_tokens: int
    output_tokens: int
    ignore_eos: bool
    # measure = "count": at concurrency c, send max(min_requests, ceil(k * c))
    # requests keeping c in flight; throughput over first send -> last completion.
    requests_per_concurrency: float
    min_requests: int
    duration_s: float | None    # count mode: keep sending until this elapses instead
    warmup_requests: int        # count mode: sent before the measured requests, not counted
    api: Api
    temperature: float
    request_timeout_s: float    # one request, first byte to last
    seed: int
    # No byte for this long (after the request was sent, or after the last
    # chunk) fails the request as "stalled"; None: derived, see stall_limit_s.
    stall_timeout_s: float | None = None
    # measure = "steady": warm up at the level, then a window with all c in
    # flight (loadgen.steady); a fixed window_s, else adaptive to the precision
    # target (relative half-width of the 95 % interval) between the bounds.
    measure: Measure = "count"
    window_s: float | None = None
    min_window_s: float = DEFAULT_MIN_WINDOW_S
    max_window_s: float = DEFAULT_MAX_WINDOW_S
    precision: float = DEFAULT_PRECISION
    warmup_s: float = 0.0       # steady: warm up at least this long (beyond one request time)
    # Traffic shape (catalog.lengths, catalog.traffic, catalog.datasets). None: the
    # fixed input_tokens/output_tokens above, fresh prompts, single requests.
    # With a distribution, input_tokens/output_tokens hold its nominal (mean) value.
    input_lengths: Lengths | None = None
    output_lengths: Lengths | None = None
    prefix: PrefixSpec | None = None
    dataset: Dataset | None = None
    sessions: SessionSpec | None = None
    arrival: Arrival = CLOSED   # closed loop, or an open-loop schedule (catalog.arrivals)
    slo: SloSpec | None = None  # per-request ceilings for goodput (catalog.slo)
    stream: bool = True         # False: plain JSON responses (TTFT = E2EL then)

    @property
    def steady(self) -> bool:
        return self.measure == "steady"

    @property
    def stall_limit_s(self) -> float:
        """The stall timeout in force: the field, else a quarter of the request
        timeout but at least 60 s (a queued request may wait long for its first
        token), never more than the request timeout."""
        if self.stall_timeout_s is not None:
            return min(self.stall_timeout_s, self.request_timeout_s)
        return min(self.request_timeout_s, max(60.0, self.request_timeout_s / 4))

    def requests_for(self, concurrency: int) -> int:
        return max(self.min_requests, math.ceil(self.requests_per_concurrency * concurrency))

    def variant(self, **changes: Any) -> Workload:
        """This workload with some fields changed (a test's shape overrides), named so
        that its records and baselines never mix with the workload's own:
        ``chat`` with ``output_tokens=512`` is ``chat[output_tokens=512]``."""
        if not changes:
            return self
        known = ({f.name for f in fields(self)} - {"name", "source", "description", "arrival"}) | set(LEVEL_FIELDS)
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown workload field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})",
                              source=str(self.source), field=unknown[0])
        suffix = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(changes.items()))
        # A fixed length given for a level replaces the workload's distribution.
        for fixed, dist in (("input_tokens", "input_lengths"), ("output_tokens", "output_lengths")):
            if fixed in changes and dist not in changes:
                changes = {**changes, dist: None}
        level = {k: changes.pop(k) for k in LEVEL_FIELDS if k in changes}
        if level:
            changes["arrival"] = self.arrival.level(str(self.source), **level)
        return replace(self, name=f"{self.name}[{suffix}]", **changes)

    def input_for(self, index: int) -> int:
        """Fresh prompt tokens of request ``index`` (a shared prefix comes on top)."""
        d = self.input_lengths
        return self.input_tokens if d is None else d.draw(self.seed, 1, index)

    def output_for(self, index: int) -> int:
        d = self.output_lengths
        return self.output_tokens if d is None else d.draw(self.seed, 2, index)

    @property
    def shaped(self) -> bool:
        """Anything beyond one fixed shape of fresh single requests."""
        return any(x is not None for x in (self.input_lengths, self.output_lengths, self.prefix,
                                           self.dataset, self.sessions))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["source"] = str(self.source)
        for key in ("input_lengths", "output_lengths", "prefix", "sessions"):
            if data[key] is not None:
                data[key] = data[key].to_dict()
        if self.dataset is not None:
            data["dataset"] = self.dataset.summary()
        data["arrival"] = self.arrival.to_dict()
        data["slo"] = self.slo.to_dict() if self.slo else None
        return data


def parse_workload(path: Path) -> Workload:
    t = Table(read_toml(path), path)
    arrival = parse_arrival(t.table("arrival"), path.parent) if t.has("arrival") else CLOSED
    # A file that counts requests keeps doing so; anything else measures a steady window.
    # An open loop counts: its requests come on a schedule, not to hold a window full.
    counting = arrival.open or any(t.has(key) for key in (*_COUNT_ONLY, "duration_s"))
    measure = t.string("measure", "count" if counting else "steady", choices=("steady", "count"))
    for key in (*_COUNT_ONLY, "duration_s") if measure == "steady" else _STEADY_ONLY:
        if t.has(key):
            other = "count" if measure == "steady" else "steady"
            raise t.error(key, f'applies to measure = "{other}"; this workload has measure = "{measure}"'
                          + ("" if t.has("measure") else " (it sets a key of the other mode)"))
    steady = measure == "steady"
    dataset = parse_dataset(t, path)
    inputs = parse_lengths(t, "input_tokens", _DATASET if dataset else None)
    outputs = parse_lengths(t, "output_tokens", _DATASET if dataset else None)
    if dataset is not None and inputs is not _DATASET:
        raise t.error("input_tokens", "a dataset workload takes its prompts from the dataset; remove input_tokens")
    inputs = None if inputs is _DATASET else inputs
    outputs = None if outputs is _DATASET else outputs
    if dataset is not None and outputs is not None and outputs.is_fixed:
        dataset = dataset.with_output_tokens(outputs.minimum)     # the workload's length wins
    if steady and arrival.open:
        raise t.error("measure", f'an open-loop arrival ({arrival.kind}) measures its scheduled requests; '
                      'use measure = "count"')
    workload = Workload(
        name=t.string("name", path.stem),
        description=t.string("description", ""),
        source=path,
        input_tokens=inputs.nominal if inputs else _dataset_mean(dataset, "input"),
        output_tokens=outputs.nominal if outputs else _dataset_mean(dataset, "output"),
        ignore_eos=t.boolean("ignore_eos", True),
        requests_per_concurrency=t.number("requests_per_concurrency", 2.0, minimum=0.0, exclusive_min=True),
        min_requests=t.integer("min_requests", 4),
        duration_s=None if steady else t.number("duration_s", None, minimum=0.0, exclusive_min=True),
        warmup_requests=t.integer("warmup_requests", 0, minimum=0),
        api=t.string("api", "completions", choices=("completions", "chat")),
        temperature=t.number("temperature", 0.0, minimum=0.0),
        request_timeout_s=t.number("request_timeout_s", 600.0, minimum=0.0, exclusive_min=True),
        seed=t.integer("seed", 0, minimum=0),
        stall_timeout_s=t.number("stall_timeout_s", None, minimum=0.0, exclusive_min=True),
        measure=measure,
        window_s=t.number("window_s", None, minimum=0.0, exclusive_min=True),
        min_window_s=t.number("min_window_s", DEFAULT_MIN_WINDOW_S, minimum=0.0),
        max_window_s=t.number("max_window_s", DEFAULT_MAX_WINDOW_S, minimum=0.0, exclusive_min=True),
        precision=t.number("precision", DEFAULT_PRECISION, minimum=0.0, maximum=1.0, exclusive_min=True),
        warmup_s=t.number("warmup_s", 0.0, minimum=0.0),
        input_lengths=inputs if inputs and not inputs.is_fixed else None,
        output_lengths=outputs if outputs and not outputs.is_fixed else None,
        prefix=parse_prefix(t),
        dataset=dataset,
        sessions=parse_sessions(t),
        arrival=arrival,
        slo=parse_slo(t.table("slo")) if t.has("slo") else None,
        stream=t.boolean("stream", True),
    )
    t.finish()
    _check_traffic(workload, t)
    if workload.min_window_s > workload.max_window_s:
        raise ConfigError(f"min_window_s {workload.min_window_s:g} is above max_window_s {workload.max_window_s:g}",
                          source=str(path), field="min_window_s")
    return workload


_DATASET = Lengths.fixed(1)     # marker: the length comes from the dataset


def _dataset_mean(dataset: Dataset | None, which: str) -> int:
    """A dataset's nominal length: mean words per prompt (or reply, or given output_tokens).
    Only an estimate for single-number consumers; the server's usage gives the true counts."""
    assert dataset is not None
    rows = dataset.rows
    if which == "input":
        values = [len(r.prompt.split()) for r in rows]
    else:
        values = [r.output_tokens if r.output_tokens is not None else len((r.reply or "").split()) for r in rows]
    return max(1, round(sum(values) / len(values)))


def _check_traffic(w: Workload, t: Table) -> None:
    if w.sessions is not None and w.api != "chat":
        raise t.error("sessions", 'multi-turn sessions need api = "chat"')
    if w.dataset is not None and (w.prefix is not None or w.sessions is not None):
        raise t.error("dataset", "a dataset workload takes its prompts as they are: no [prefix] or [sessions]")
    if w.sessions is not None and w.measure != "count":
        raise t.error("sessions", 'multi-turn sessions are measured by count: set measure = "count"')
    if w.sessions is not None and w.duration_s is not None:
        raise t.error("duration_s", "a level of sessions sends whole sessions of requests_for(c) requests; "
                                    "remove duration_s")
    if w.sessions is not None and w.arrival.open:
        raise t.error("sessions", "multi-turn sessions pace themselves (think time); they take no open-loop "
                                  "[arrival]")
    if w.stream is False and w.sessions is not None:
        raise t.error("stream", "multi-turn sessions stream their turns; remove stream = false")
    if w.dataset is not None and w.output_lengths is not None:
        raise t.error("output_tokens", "with a dataset give one fixed output_tokens (or none: the dataset's)")


def load_workloads(dirs: Sequence[Path]) -> Catalog:
    """The workloads found in ``dirs`` (``workloads/`` folders)."""
    return load_catalog_files("workload", dirs, parse_workload)
