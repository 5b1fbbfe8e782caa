"""The harness's settings: CLI > ini > defaults, parsed and validated once.

No pytest imports: the plugin hands in a getter that applies that precedence.
Values are checked by ``parsing``'s validators (the argparse ``type=``
callbacks of the options), so bad input stops the run before anything boots.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .engines import parse_engine
from .gate.specs import parse_tolerances
from .parsing import (
    HISTORY_OFF, parse_concurrency, parse_endpoint, parse_rates, parse_error_rate, parse_gate, parse_history,
    parse_non_negative_float, parse_positive_float,
    parse_positive_int, parse_precision, parse_ray_address, parse_sim_fault, split_names,
)
from .errors import ConfigError

# A baseline carries the trial-to-trial noise its later comparisons stand on;
# three trials are the fewest that measure it. --trials overrides.
BASELINE_TRIALS = 3


@dataclass(frozen=True)
class Mm27Config:
    topologies: tuple[str, ...] = ("all",)
    topologies_given: bool = False          # --topology / mm27_topology was set (endpoint runs need to know)
    engine: str = "auto"
    endpoints: tuple[str, ...] = ()
    workload: str | None = None             # None: each topology's own workload
    concurrency: tuple[int, ...] | None = None
    rates: tuple[float, ...] | None = None  # open-loop request rates as the levels (requests/s)
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
    progress_every_s: float = 5.0           # progress lines on a non-terminal; 0: no live progress
    history: str | None = None              # SQLite path or postgresql:// URL; None: keep no history
    gate: str | None = None                 # "history": judge change points over the history too
    ray_address: str | None = None          # boot on this Ray cluster; None: local processes
    ray_load_workers: int | None = None     # load workers as Ray actors on this many nodes; None: local

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


def _history_location(value: Any, results_dir: Path, path: Callable[[str], Path]) -> str | None:
    """Default: <results>/history.sqlite; a URL as given; a path relative to the rootdir; off: none."""
    if value in (None, ""):
        return str(results_dir / "history.sqlite")
    text = _convert("mm27_history", value, parse_history)
    if text.lower() in HISTORY_OFF:
        return None
    return text if "://" in text else str(path(text))


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
        topologies_given=bool(split_names(get("topology"))),
        engine=_convert("mm27_engine", get("engine") or "auto", parse_engine),
        endpoints=endpoints,
        workload=get("workload") or None,
        concurrency=concurrency,
        rates=_convert("mm27_rate", get("rate"), parse_rates) if get("rate") else None,
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
        progress_every_s=_convert("mm27_progress_every", get("progress_every"), parse_non_negative_float)
        if get("progress_every") is not None else 5.0,
    )
    history = _history_location(get("history"), cfg.results_dir, path)
    gate = _convert("mm27_gate", get("gate"), parse_gate) if get("gate") else None
    if gate == "history" and history is None:
        raise ConfigError("--gate history needs a history; --history is off", field="--history")
    if gate == "history":
        from .history.changepoints import ChangePointsUnavailable, load_ruptures
        try:
            load_ruptures()     # before anything boots, not after the night's sweep
        except ChangePointsUnavailable as exc:
            raise ConfigError(str(exc), field="--gate") from None
    ray_address = _convert("mm27_ray_address", get("ray_address"), parse_ray_address) if get("ray_address") else None
    if ray_address:
        from .cluster.connect import require_ray
        require_ray()       # a missing Ray stops the run now, not at the first boot
    ray_workers = get("ray_load_workers")
    ray_workers = _convert("mm27_ray_load_workers", ray_workers, parse_positive_int) if ray_workers else None
    if ray_workers and not ray_address:
        raise ConfigError("--ray-load-workers runs the load on a Ray cluster: give --ray-address too",
                          field="--ray-load-workers")
    cfg = Mm27Config(**{**cfg.__dict__, "history": history, "gate": gate, "ray_address": ray_address,
                        "ray_load_workers": ray_workers})
    if cfg.engine == "endpoint" and not cfg.endpoints:
        raise ConfigError("--engine endpoint needs at least one --endpoint URL", field="--endpoint")
    if cfg.endpoints and cfg.engine not in ("endpoint", "auto"):
        raise ConfigError(f"--endpoint is only used with --engine endpoint (got --engine {cfg.engine})",
                          field="--endpoint")
    if cfg.endpoints and cfg.engine == "auto":
        cfg = Mm27Config(**{**cfg.__dict__, "engine": "endpoint"})
    return cfg
