"""The run record as types: what one sweep of one topology measured, and how it was judged.

A :class:`RunRecord` holds the run's header (engine, host, hardware,
topology and workload as they were), its :class:`LevelResult` per
concurrency and the errors met. A level holds its floor, every
:class:`Trial` (the load generator's metrics plus what the GPUs and the
servers' CPUs did meanwhile), its :class:`Verdict` and, with a baseline, its
:class:`LevelComparison`. Every stage after the load generator reads these
attributes; ``to_dict``/``from_dict`` are the one way in and out of JSON
(``records.store`` writes; ``records.migrate`` fills in what records of older harnesses lack).

The JSON keeps the flat shape readers of earlier versions know: a level's
``floor``, ``floor_metric`` and ``floor_note``, and its ``metrics`` (a copy
of the median trial, the one floors are judged on).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields
from typing import Any

from ..loadgen.metrics import LevelMetrics
from ..loadgen.samples import Percentiles

SCHEMA = "pytest-mm27/run-record"
SCHEMA_VERSION = 1

# ---- verdicts and comparisons ------------------------------------------------------------------

PASS = "pass"
FAIL = "FAIL"
INVALID = "invalid"      # measured, but the numbers cannot be trusted (client-bound)
ERROR = "error"          # nothing measured: the server or the run broke

OK = "ok"
REGRESSED = "regressed"
IMPROVED = "improved"
MISSING = "missing"
# worst first: a level (or record) takes the worst status of its metrics
STATUS_ORDER = (REGRESSED, INVALID, MISSING, IMPROVED, OK)
SWEEP = 0               # MetricComparison.concurrency of a whole-sweep comparison


def worst(statuses: Iterable[str]) -> str:
    ranked = [STATUS_ORDER.index(s) for s in statuses]
    return STATUS_ORDER[min(ranked)] if ranked else OK


@dataclass(frozen=True)
class Verdict:
    status: str                         # PASS, FAIL, INVALID or ERROR
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    tag: str = ""                       # why, in a word or two, for tables: "client-bound"

    @property
    def message(self) -> str:
        return "\n".join(self.problems or self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "problems": list(self.problems), "notes": list(self.notes),
                "tag": self.tag}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, old_tag: str = "") -> Verdict:
        data = data or {}
        # Records written before verdicts had tags: the client-bound flag was the only reason shown.
        return cls(str(data.get("status", "")), tuple(data.get("problems") or ()), tuple(data.get("notes") or ()),
                   str(data.get("tag", old_tag) or ""))


@dataclass
class MetricComparison:
    metric: str                       # label, e.g. output_tok_s
    concurrency: int                  # SWEEP (0) for the whole sweep
    status: str
    message: str
    baseline: float | None = None     # geometric mean of the baseline's trials (arithmetic for error rate)
    now: float | None = None
    change: float | None = None       # now / baseline - 1 (difference for error rate)
    tolerance: float | None = None
    noise: float | None = None        # half-width of the interval, relative (0.012 = ±1.2 %)
    ci: tuple[float, float] | None = None   # interval of the ratio now / baseline
    confidence: float | None = None   # two-sided level of ``ci``
    n_baseline: int = 0
    n_now: int = 0
    higher_is_better: bool = True
    name: str = ""                    # tolerance key, e.g. throughput
    noise_source: str = ""            # "12 df" (trial-to-trial, pooled) or "within-level" (single trials)

    @property
    def blind(self) -> bool:
        """The noise band is wider than the tolerance: a change between the two would pass unseen."""
        return self.noise is not None and self.tolerance is not None and self.noise > self.tolerance

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["ci"] = list(self.ci) if self.ci else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricComparison:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("ci"):
            kwargs["ci"] = tuple(kwargs["ci"])
        return cls(**kwargs)


@dataclass
class LevelComparison:
    concurrency: int
    metrics: list[MetricComparison]
    note: str = ""                    # why the level is invalid or missing
    case: str | None = None           # the user test's case id (see LevelResult.case)

    @property
    def status(self) -> str:
        return worst(m.status for m in self.metrics) if self.metrics else MISSING

    @property
    def regressions(self) -> list[MetricComparison]:
        return [m for m in self.metrics if m.status == REGRESSED]

    def get(self, name: str) -> MetricComparison | None:
        """A metric by tolerance key (``throughput``) or label (``output_tok_s``)."""
        return next((m for m in self.metrics if name in (m.name, m.metric)), None)

    def to_dict(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "status": self.status, "note": self.note,
                "metrics": [m.to_dict() for m in self.metrics], **({"case": self.case} if self.case else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LevelComparison:
        return cls(int(data["concurrency"]), [MetricComparison.from_dict(m) for m in data.get("metrics") or ()],
                   str(data.get("note") or ""), data.get("case"))


@dataclass
class RecordComparison:
    topology: str
    workload: str
    profile: str
    baseline_path: str | None
    levels: list[LevelComparison]
    tolerances: dict[str, float]
    confidence: float
    noise_source: str                 # how the noise was measured, for the report
    baseline_info: dict[str, Any] = field(default_factory=dict)
    sweep: list[MetricComparison] = field(default_factory=list)    # whole-sweep comparisons
    # What the two hosts differ in (CPU, GPU clocks and power limit, driver, torch...),
    # said before any number: a change may be the box, not the software.
    host_differences: list[str] = field(default_factory=list)
    # What the workload and the topology say differently: a changed serve flag is
    # what a regression often is; a changed request shape makes nothing comparable.
    definition_differences: list[str] = field(default_factory=list)
    baseline_note: str = ""

    @property
    def status(self) -> str:
        if not self.levels:
            return MISSING
        return worst([lv.status for lv in self.levels] + [m.status for m in self.sweep])

    def with_status(self, *statuses: str) -> list[MetricComparison]:
        return [m for lv in self.levels for m in lv.metrics if m.status in statuses] + [
            m for m in self.sweep if m.status in statuses]

    @property
    def regressions(self) -> list[MetricComparison]:
        return self.with_status(REGRESSED)

    @property
    def regressed(self) -> bool:
        return bool(self.regressions)

    def level(self, concurrency: int, case: str | None = None) -> LevelComparison | None:
        return next((lv for lv in self.levels if lv.concurrency == concurrency and lv.case == case), None)

    def summary(self) -> str:
        counts = {s: len(self.with_status(s)) for s in STATUS_ORDER}
        parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        return (f"{self.topology} vs baseline {self.baseline_path or '-'}: {self.status}"
                + (f" ({parts})" if parts else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"topology": self.topology, "workload": self.workload, "profile": self.profile,
                "baseline_path": self.baseline_path, "status": self.status, "tolerances": self.tolerances,
                "confidence": self.confidence, "noise_source": self.noise_source,
                "baseline_info": self.baseline_info, "levels": [lv.to_dict() for lv in self.levels],
                "sweep": [m.to_dict() for m in self.sweep], "host_differences": list(self.host_differences),
                "definition_differences": list(self.definition_differences), "baseline_note": self.baseline_note}


# ---- trials and levels -------------------------------------------------------------------------

@dataclass
class Trial(LevelMetrics):
    """One measurement of a level: the load generator's metrics, and what the host saw meanwhile."""

    gpu: dict[str, Any] | None = None               # host.telemetry GpuSampler.summary()
    server_cpu: dict[str, dict[str, Any]] | None = None     # per server: host.servercpu ServerCpu.to_dict()
    front_end_bound: bool = False
    front_end_reason: str | None = None
    samples: str | None = None      # its per-request samples file, relative to the record (records.samples)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data["gpu"] is None:
            del data["gpu"]         # no NVML here: the record says nothing rather than null
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trial:
        """Lenient: a partial dict (an older record, a hand-made test input) gets neutral defaults."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data:
                value = data[f.name]
                if f.name in LevelMetrics._NESTED and isinstance(value, Mapping):
                    value = Percentiles.from_dict({**_EMPTY_PERCENTILES, **value})
                kwargs[f.name] = value
            elif f.default is NO_DEFAULT and f.default_factory is NO_DEFAULT:
                kwargs[f.name] = Percentiles.of([]) if f.name in LevelMetrics._NESTED else ({} if f.name == "errors"
                                                                                            else 0)
        if "ok" not in data:        # what a partial dict means by leaving it out
            kwargs["ok"] = kwargs["requests"] - kwargs["failed"]
        if "error_rate" not in data and kwargs["requests"]:
            kwargs["error_rate"] = kwargs["failed"] / kwargs["requests"]
        return cls(**kwargs)

    @classmethod
    def of(cls, metrics: LevelMetrics, **extras: Any) -> Trial:
        return cls(**{f.name: getattr(metrics, f.name) for f in fields(LevelMetrics)}, **extras)


_EMPTY_PERCENTILES = {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "min": 0.0, "max": 0.0}


def as_trial(value: Trial | Mapping[str, Any]) -> Trial:
    return value if isinstance(value, Trial) else Trial.from_dict(value)


@dataclass(frozen=True)
class FloorRef:
    """The floor a level was judged against, as the record keeps it."""

    tok_s: float
    metric: str = "output_tok_s"
    note: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    trials: list[Trial] = field(default_factory=list)
    verdict: Verdict = field(default_factory=lambda: Verdict(""))
    floor: FloorRef | None = None
    comparison: LevelComparison | None = None
    # A user test's level is named by its case id (the test, its parameters, the level),
    # so a baseline pairs it with the same test's level; the suite's levels have none.
    case: str | None = None
    # The trial a record names as the level's own (its JSON ``metrics``), when it names one.
    named: Trial | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[int, str]:
        return self.concurrency, self.case or ""

    @property
    def metrics(self) -> Trial | None:
        """The level's figures: the trial whose output tok/s is the median (floors are judged on a
        real trial), or the one the record names."""
        if self.named is not None:
            return self.named
        if not self.trials:
            return None
        ranked = sorted(self.trials, key=lambda t: t.output_tok_s or 0.0)
        return ranked[(len(ranked) - 1) // 2]

    def to_dict(self) -> dict[str, Any]:
        median = self.metrics
        return {
            "concurrency": self.concurrency,
            **({"case": self.case} if self.case else {}),
            "floor": self.floor.tok_s if self.floor else None,
            "floor_metric": self.floor.metric if self.floor else None,
            "floor_note": self.floor.note if self.floor else None,
            "metrics": median.to_dict() if median else None,
            "trials": [t.to_dict() for t in self.trials],
            "verdict": self.verdict.to_dict(),
            **({"comparison": self.comparison.to_dict()} if self.comparison else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LevelResult:
        trials = [as_trial(t) for t in data.get("trials") or () if isinstance(t, Mapping)]
        named = data.get("metrics")
        if not trials and isinstance(named, Mapping):
            trials = [as_trial(named)]     # a hand-made record may give only the level's figures
        floor = data.get("floor")
        client_bound = bool(isinstance(named, Mapping) and named.get("client_bound"))
        return cls(
            concurrency=int(data["concurrency"]),
            trials=trials,
            named=as_trial(named) if isinstance(named, Mapping) else None,
            verdict=Verdict.from_dict(data.get("verdict"), old_tag="client-bound" if client_bound else ""),
            floor=FloorRef(float(floor), str(data.get("floor_metric") or "output_tok_s"), data.get("floor_note"))
            if isinstance(floor, (int, float)) and not isinstance(floor, bool) else None,
            comparison=LevelComparison.from_dict(data["comparison"]) if data.get("comparison") else None,
            case=data.get("case"),
        )


def as_level(value: LevelResult | Mapping[str, Any]) -> LevelResult:
    return value if isinstance(value, LevelResult) else LevelResult.from_dict(value)


def level_trials(level: LevelResult | Mapping[str, Any] | None) -> list[Trial]:
    return as_level(level).trials if level else []


# ---- the record ---------------------------------------------------------------------------------

@dataclass
class EngineInfo:
    name: str = ""
    version: str | None = None
    reason: str = ""


@dataclass
class HardwareInfo:
    profile: str = ""
    simulated: bool = False
    gpus: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None       # why the profile is what it is (a relabelled box, say)


@dataclass
class RunError:
    message: str
    at: str | None = None
    concurrency: int | None = None


@dataclass
class RunRecord:
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION
    harness_version: str = ""
    created_at: str | None = None
    finished_at: str | None = None
    status: str = "running"
    run_id: str = ""
    git_commit: str | None = None
    engine: EngineInfo = field(default_factory=EngineInfo)
    hardware: HardwareInfo = field(default_factory=HardwareInfo)
    host: dict[str, Any] = field(default_factory=dict)          # host.hostfacts
    topology: dict[str, Any] = field(default_factory=dict)      # Topology.to_dict()
    workload: dict[str, Any] = field(default_factory=dict)      # Workload.to_dict()
    options: dict[str, Any] = field(default_factory=dict)
    parallel: dict[str, Any] = field(default_factory=dict)      # xdist worker of the run
    launch: dict[str, Any] | None = None                        # LaunchPlan.to_dict()
    model_dir: str | None = None
    startup_s: float | None = None
    teardown: dict[str, Any] | None = None
    # run records: the baseline compared with ({path, note}); baseline files: how it was promoted
    baseline: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None                         # baseline files: gate.noise.record_noise
    levels: list[LevelResult] = field(default_factory=list)
    errors: list[RunError] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)         # keys of later versions, kept as they came

    @property
    def topology_name(self) -> str:
        return str(self.topology.get("name") or "")

    @property
    def workload_name(self) -> str:
        return str(self.workload.get("name") or "")

    @property
    def key(self) -> tuple[str, str]:
        """(topology, workload): what the record measured, as baselines, comparisons and reports key it."""
        return self.topology_name, self.workload_name

    def level(self, concurrency: int, case: str | None = None) -> LevelResult | None:
        return next((lv for lv in self.levels if lv.key == (concurrency, case or "")), None)

    def put_level(self, level: LevelResult) -> None:
        """Add or replace (a re-run level) one level, keeping them in concurrency order."""
        self.levels = sorted([lv for lv in self.levels if lv.key != level.key] + [level], key=lambda lv: lv.key)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": self.schema, "schema_version": self.schema_version, "harness_version": self.harness_version,
            "created_at": self.created_at, "finished_at": self.finished_at, "status": self.status,
            "run_id": self.run_id, "git_commit": self.git_commit,
            "engine": {"name": self.engine.name, "version": self.engine.version, "reason": self.engine.reason},
            "host": self.host,
            "hardware": {"profile": self.hardware.profile, "simulated": self.hardware.simulated,
                         "gpus": self.hardware.gpus,
                         **({"profile_note": self.hardware.note} if self.hardware.note else {})},
            "topology": self.topology, "workload": self.workload, "options": self.options,
            "parallel": self.parallel, "launch": self.launch,
        }
        for key in ("model_dir", "startup_s", "teardown", "baseline", "noise"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        data["levels"] = [lv.to_dict() for lv in self.levels]
        data["errors"] = [{"at": e.at, "concurrency": e.concurrency, "message": e.message} for e in self.errors]
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """From JSON of this schema (``records.migrate.normalise`` fills in what older harnesses left out)."""
        engine, hardware = data.get("engine") or {}, data.get("hardware") or {}

        def snapshot(key: str) -> dict[str, Any]:
            return dict(data.get(key) or {})

        def optional(key: str) -> dict[str, Any] | None:
            return dict(data[key]) if isinstance(data.get(key), Mapping) else None

        known = {f.name for f in fields(cls)} | {"engine", "hardware"}
        return cls(
            schema=str(data.get("schema", SCHEMA)), schema_version=int(data.get("schema_version", SCHEMA_VERSION)),
            harness_version=str(data.get("harness_version") or ""), created_at=data.get("created_at"),
            finished_at=data.get("finished_at"), status=str(data.get("status") or "running"),
            run_id=str(data.get("run_id") or ""), git_commit=data.get("git_commit"),
            engine=EngineInfo(str(engine.get("name") or ""), engine.get("version"), str(engine.get("reason") or "")),
            hardware=HardwareInfo(str(hardware.get("profile") or ""), bool(hardware.get("simulated")),
                                  list(hardware.get("gpus") or []), hardware.get("profile_note")),
            host=snapshot("host"), topology=snapshot("topology"), workload=snapshot("workload"),
            options=snapshot("options"), parallel=snapshot("parallel"), launch=optional("launch"),
            model_dir=data.get("model_dir"), startup_s=data.get("startup_s"), teardown=optional("teardown"),
            baseline=optional("baseline"), noise=optional("noise"),
            levels=[as_level(lv) for lv in data.get("levels") or () if isinstance(lv, Mapping)],
            errors=[RunError(str(e.get("message", "")), e.get("at"), e.get("concurrency"))
                    for e in data.get("errors") or () if isinstance(e, Mapping)],
            extra={k: v for k, v in data.items() if k not in known},
        )


def as_record(value: RunRecord | Mapping[str, Any]) -> RunRecord:
    """Readers take a record or its JSON form (tests and scripts often hold the latter)."""
    if isinstance(value, RunRecord):
        return value
    from .migrate import normalise

    return RunRecord.from_dict(normalise(value))
