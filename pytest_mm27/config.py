"""The harness's settings: CLI > ini > defaults, parsed and validated once.

No pytest imports: the plugin hands in a getter that applies that precedence.
The ``parse_*`` functions double as argparse ``type=`` callbacks so bad values
stop the run before anything boots.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .engines import ENGINE_CHOICES
from .gate.specs import parse_tolerances
from .errors import ConfigError

# A baseline carries the trial-to-trial noise its later comparisons stand on;
# three trials are the fewest that measure it. --trials overrides.
BASELINE_TRIALS = 3
# Simulator fault knobs a user may set with --sim-fault NAME=VALUE.
SIM_FAULTS: Mapping[str, Callable[[str], float | int]] = MappingProxyType({
    "slowdown": float, "error-rate": float, "crash-after": int, "hang-after": int, "startup-delay": float,
    "startup-crash": float, "malformed-sse-rate": float, "cut-stream-rate": float,
})


def split_names(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """``--topology a,b --topology c`` and ini lines -> ('a', 'b', 'c')."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        out.extend(part.strip() for part in value.replace("\n", ",").split(",") if part.strip())
    return tuple(dict.fromkeys(out))


def parse_concurrency(text: str) -> tuple[int, ...]:
    levels: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"concurrency levels must be positive integers, got {part!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"concurrency levels must be positive integers, got {value}")
        levels.append(value)
    if not levels:
        raise argparse.ArgumentTypeError("no concurrency levels given")
    return tuple(sorted(set(levels)))


def parse_engine(text: str) -> str:
    if text not in ENGINE_CHOICES:
        raise argparse.ArgumentTypeError(f"unknown engine {text!r}; choose from {', '.join(ENGINE_CHOICES)}")
    return text


def parse_endpoint(text: str) -> str:
    url = text.strip().rstrip("/")
    if not (url.startswith("http://") or url.startswith("https://")):
        raise argparse.ArgumentTypeError(f"endpoint must be an http(s) URL, got {text!r}")
    if url.endswith("/v1"):
        url = url[:-3]
    return url


def parse_fraction(text: str, what: str = "value") -> float:
    """``0.05`` or ``5%``: a share between 0 and 1."""
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number like 0.01 or 1%, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{what} must be between 0 and 1, got {text!r}")
    return value


def parse_error_rate(text: str) -> float:
    return parse_fraction(text, "error rate")


def parse_sim_fault(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    name = name.strip().replace("_", "-")
    if not sep or name not in SIM_FAULTS:
        raise argparse.ArgumentTypeError(
            f"sim fault must be NAME=VALUE with NAME one of {', '.join(SIM_FAULTS)}; got {text!r}")
    try:
        SIM_FAULTS[name](value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sim fault {name} needs a number, got {value!r}") from None
    return name, value.strip()


def parse_precision(text: str) -> float:
    """``1%`` or ``0.01``: the relative half-width of the 95 % interval a steady window aims for."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"precision must be a percentage like 1% or a fraction like 0.01, "
                                         f"got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"precision must be above 0 and below 100%, got {text!r}")
    return value


def parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


@dataclass(frozen=True)
class Mm27Config:
    topologies: tuple[str, ...] = ("all",)
    engine: str = "auto"
    endpoints: tuple[str, ...] = ()
    workload: str | None = None             # None: each topology's own workload
    concurrency: tuple[int, ...] | None = None
    results_dir: Path = Path("results")
    topology_dirs: tuple[Path, ...] = ()
    workload_dirs: tuple[Path, ...] = ()
    floor_dirs: tuple[Path, ...] = ()
    vllm_command: tuple[str, ...] = ("vllm",)
    api_key: str | None = None
    host: str = "127.0.0.1"
    sim_faults: Mapping[str, str] = field(default_factory=dict)
    max_error_rate: float = 0.0
    workers: int | None = None
    startup_timeout_s: float | None = None
    level_timeout_s: float | None = None
    hardware: str | None = None             # overrides the topologies' hardware profile
    seed: int = 0
    trials: int = 1
    precision: float | None = None          # steady windows' target; None: the workload's
    max_window_s: float | None = None       # steady windows' cap; None: the workload's
    baseline: str | None = None             # "auto" or a path
    save_baseline: str | bool = False       # True, or a name
    force: bool = False
    tolerances: Mapping[str, float] = field(default_factory=dict)
    report_md: Path | None = None
    plots_dir: Path | None = None
    pytest_benchmark_json: Path | None = None

    @property
    def baselines_dir(self) -> Path:
        return self.results_dir / "baselines"

    def sim_args(self) -> tuple[str, ...]:
        args: list[str] = []
        for name, value in self.sim_faults.items():
            args += [f"--{name}", value]
        return tuple(args)


def _baseline_spec(value: Any, path: Callable[[str], Path]) -> str | None:
    if not value:
        return None
    return "auto" if value == "auto" else str(path(value))


def _save_name(value: Any) -> str | bool:
    """--save-baseline alone -> True; --save-baseline NAME -> NAME; ini 'true'/'false' too."""
    if value in (None, False, "", "false", "False", "0"):
        return False
    if value in (True, "true", "True", "1"):
        return True
    return str(value)


def _convert(name: str, value: Any, parse: Callable[[str], Any]) -> Any:
    """Apply a ``type=`` parser to an ini value (CLI values arrive parsed)."""
    if not isinstance(value, str):
        return value
    try:
        return parse(value)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(str(exc), source="ini", field=name) from None


def build_config(get: Callable[[str], Any], rootdir: Path) -> Mm27Config:
    """``get(name)`` returns the CLI value if given, else the ini value, else None."""

    def path(value: str | Path) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else rootdir / p

    def paths(name: str) -> tuple[Path, ...]:
        return tuple(path(v) for v in split_names(get(name)))

    concurrency = get("concurrency")
    if concurrency is not None:
        concurrency = _convert("mm27_concurrency", concurrency, parse_concurrency)
    faults: dict[str, str] = {}
    for item in get("sim_fault") or ():
        name, value = _convert("mm27_sim_fault", item, parse_sim_fault)
        faults[name] = value
    endpoints = tuple(_convert("mm27_endpoint", e, parse_endpoint) for e in split_names(get("endpoint")))
    vllm = get("vllm") or os.environ.get("MM27_VLLM") or "vllm"
    workers = get("workers")
    startup = get("startup_timeout")
    cfg = Mm27Config(
        topologies=split_names(get("topology")) or ("all",),
        engine=_convert("mm27_engine", get("engine") or "auto", parse_engine),
        endpoints=endpoints,
        workload=get("workload") or None,
        concurrency=concurrency,
        results_dir=path(get("results_dir") or "results"),
        topology_dirs=paths("topology_dir"),
        workload_dirs=paths("workload_dir"),
        floor_dirs=paths("floors_dir"),
        vllm_command=tuple(shlex.split(vllm)) if isinstance(vllm, str) else tuple(vllm),
        api_key=get("api_key") or os.environ.get("MM27_API_KEY") or None,
        host=get("host") or "127.0.0.1",
        sim_faults=MappingProxyType(faults),
        max_error_rate=_convert("mm27_max_error_rate", get("max_error_rate") or "0", parse_error_rate),
        workers=_convert("mm27_workers", workers, parse_positive_int) if workers else None,
        startup_timeout_s=_convert("mm27_startup_timeout", startup, parse_positive_float) if startup else None,
        level_timeout_s=(_convert("mm27_level_timeout", get("level_timeout"), parse_positive_float)
                         if get("level_timeout") else None),
        hardware=get("hardware") or None,
        seed=int(get("seed") or 0),
        trials=_convert("mm27_trials", get("trials") or (str(BASELINE_TRIALS) if _save_name(get("save_baseline"))
                                                         else "1"), parse_positive_int),
        precision=_convert("mm27_precision", get("precision"), parse_precision) if get("precision") else None,
        max_window_s=(_convert("mm27_max_window", get("max_window"), parse_positive_float)
                      if get("max_window") else None),
        baseline=_baseline_spec(get("baseline"), path),
        save_baseline=_save_name(get("save_baseline")),
        force=bool(get("force")),
        tolerances=MappingProxyType(_convert("mm27_regression_tolerance", get("regression_tolerance") or "",
                                             parse_tolerances) if get("regression_tolerance") else {}),
        report_md=path(get("report_md")) if get("report_md") else None,
        plots_dir=path(get("plots_dir")) if get("plots_dir") else None,
        pytest_benchmark_json=path(get("pytest_benchmark_json")) if get("pytest_benchmark_json") else None,
    )
    if cfg.engine == "endpoint" and not cfg.endpoints:
        raise ConfigError("--engine endpoint needs at least one --endpoint URL", field="--endpoint")
    if cfg.endpoints and cfg.engine not in ("endpoint", "auto"):
        raise ConfigError(f"--endpoint is only used with --engine endpoint (got --engine {cfg.engine})",
                          field="--endpoint")
    if cfg.endpoints and cfg.engine == "auto":
        cfg = Mm27Config(**{**cfg.__dict__, "engine": "endpoint"})
    return cfg
