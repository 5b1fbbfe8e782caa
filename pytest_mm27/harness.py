"""The harness behind the plugin: boot a topology, measure levels, keep records.

No pytest imports. The plugin asks for one (topology, concurrency) at a time;
the harness keeps at most one topology alive, boots it on first use, records
every level as soon as it is measured and tears everything down on close().
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .gate.baseline import BaselineMatch, resolve_baselines
from .gate.compare import REGRESSED, compare_records
from .config import Mm27Config
from .engines import select_engine
from .engines.base import EngineOptions, LaunchPlan, split_devices
from .errors import ConfigError, LaunchError, Mm27Error
from .catalog.floors import FloorTable, load_floors
from .engines.vllm import vllm_python
from .host.gpus import check_free_memory, discover_gpus
from .host.leases import lease_devices
from .host.hostfacts import collect_host_facts
from .host.launcher import Launcher
from .loadgen import LevelMetrics, run_level
from .catalog.paths import catalog_dirs
from .records.store import SCHEMA, SCHEMA_VERSION, RunRecord, check_writable_dir, git_commit, new_run_id, now_iso
from .secrets import add_secret
from .sim.specs import fit_errors
from .host.servercpu import DEFAULT_TITLE_PREFIX, ServerCpuSampler, front_end_bound
from .host.telemetry import GpuSampler
from .catalog.topology import Topology, load_catalog
from .gate.verdict import ERROR, FAIL, Verdict, judge_level
from .catalog.workload import Workload, load_workloads


@dataclass
class EngineChoice:
    name: str            # vllm | sim | endpoint
    reason: str          # said in the first line of output
    engine: Any = None   # the Engine object, None for endpoint


@dataclass
class LiveTopology:
    topology: Topology
    record: RunRecord
    plan: LaunchPlan | None = None
    launcher: Launcher | None = None
    lease: Any = None
    endpoints: tuple[str, ...] = ()
    model: str = ""
    failure: str | None = None      # once set, every later level of this topology errors with it
    gpus: tuple[int, ...] = ()      # leased GPUs, sampled for telemetry during each level
    measured: list[int] = field(default_factory=list)


class Harness:
    def __init__(self, cfg: Mm27Config, rootdir: Path, run_id: str | None = None):
        self.cfg = cfg
        self.rootdir = rootdir
        self.run_id = run_id or new_run_id()
        self.run_dir = cfg.results_dir / "runs" / self.run_id
        add_secret(cfg.api_key)                 # never written to records, baselines or reports
        check_writable_dir(cfg.results_dir)     # a bad --results-dir fails now, before anything boots
        topo_catalog = load_catalog([*cfg.topology_dirs, *catalog_dirs("topologies")])
        self.topologies: list[Topology] = topo_catalog.select(cfg.topologies)
        if cfg.hardware:
            # The box differs from the topology's reference: floors, baselines and the
            # simulator then use this profile.
            self.topologies = [dataclasses.replace(t, hardware=cfg.hardware) for t in self.topologies]
        # --workload for every topology, else each topology's own (a GPU check's shape, a CPU test's).
        workloads = load_workloads([*cfg.workload_dirs, *catalog_dirs("workloads")])
        self.workloads: dict[str, Workload] = {
            t.name: workloads.get(cfg.workload or t.workload) for t in self.topologies}
        self._floor_dirs = [*cfg.floor_dirs, *catalog_dirs("floors")]
        self._floors: dict[str, FloorTable] = {}
        self.options = EngineOptions(
            host=cfg.host, api_key=cfg.api_key, vllm_command=cfg.vllm_command,
            sim_args=cfg.sim_args(), seed=cfg.seed,
        )
        self.choices: dict[str, EngineChoice] = {}
        # Topologies taken in by `--topology all` that no engine here can run
        # (a CPU vLLM one without vLLM): left out with the reason, not fatal.
        self.not_run: dict[str, str] = {}
        for topology in self.topologies:
            try:
                self.choices[topology.name] = self._choose(topology)
            except ConfigError as exc:
                if "all" not in cfg.topologies:
                    raise
                self.not_run[topology.name] = getattr(exc, "reason", str(exc))
        self.topologies = [t for t in self.topologies if t.name in self.choices]
        self._live: LiveTopology | None = None
        self._records: dict[str, RunRecord] = {}
        self._git = git_commit(rootdir)
        self.baselines: dict[str, BaselineMatch] = self._resolve_baselines()
        self._sim_errors = fit_errors() if any(c.name == "sim" for c in self.choices.values()) else {}
        for topology in self.topologies:        # a broken floors file is bad input: refuse it now
            self.floors_for(topology)

    # ---- selection, before anything boots -------------------------------------------------
    def _choose(self, topology: Topology) -> EngineChoice:
        if self.cfg.engine == "endpoint":
            return EngineChoice("endpoint", f"endpoint ({', '.join(self.cfg.endpoints)}; nothing is booted)")
        engine, reason = select_engine(self.cfg.engine, topology, self.options)
        return EngineChoice(engine.name, reason, engine)

    def engine_line(self) -> str:
        reasons = list(dict.fromkeys(c.reason for c in self.choices.values()))
        if len(reasons) == 1:
            line = f"engine: {reasons[0]}"
        else:
            line = "engine: " + "; ".join(f"{name}: {c.reason}" for name, c in self.choices.items())
        by_reason: dict[str, list[str]] = {}
        for name, why in self.not_run.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            line += f"\nmm27: not run here: {', '.join(names)} ({why})"
        return line

    def levels_for(self, topology: Topology) -> tuple[int, ...]:
        return self.cfg.concurrency or topology.concurrency_levels

    def floors_for(self, topology: Topology) -> FloorTable:
        if topology.hardware not in self._floors:
            self._floors[topology.hardware] = load_floors(self._floor_dirs, topology.hardware)
        return self._floors[topology.hardware]

    def floor_value(self, topology: Topology, concurrency: int) -> float | None:
        floor = self.floors_for(topology).get(topology.name, self.workloads[topology.name].name, concurrency)
        return floor.tok_s if floor else None

    # ---- records ------------------------------------------------------------------------------
    def _header(self, topology: Topology) -> dict[str, Any]:
        choice = self.choices[topology.name]
        return {
            "run_id": self.run_id,
            "git_commit": self._git,
            "engine": {"name": choice.name, "version": None, "reason": choice.reason},
            "host": collect_host_facts(),
            "hardware": {"profile": topology.hardware, "simulated": choice.name == "sim", "gpus": []},
            "topology": topology.to_dict(),
            "workload": self.workloads[topology.name].to_dict(),
            "options": {"max_error_rate": self.cfg.max_error_rate, "trials": self.cfg.trials,
                        "concurrency_override": list(self.cfg.concurrency or ()),
                        "sim_faults": dict(self.cfg.sim_faults)},
            "launch": None,
            # Under pytest-xdist each worker sweeps whole topologies; they may run side by side.
            "parallel": {"xdist_worker": os.environ.get("PYTEST_XDIST_WORKER"),
                         "xdist_workers": int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)},
        }

    def record_for(self, topology: Topology) -> RunRecord:
        if topology.name not in self._records:
            header = self._header(topology)
            match = self.baselines.get(topology.name)
            if match is not None:
                header["baseline"] = {"path": str(match.path) if match.path else None, "note": match.note}
            self._records[topology.name] = RunRecord(self.run_dir / f"{topology.name}.json", header)
            self._records[topology.name].save()
        return self._records[topology.name]

    def _resolve_baselines(self) -> dict[str, BaselineMatch]:
        """Find (auto) or load and check (PATH) baselines before anything boots."""
        if not self.cfg.baseline:
            return {}
        headers = [{"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **self._header(t), "levels": []}
                   for t in self.topologies]
        matches = resolve_baselines(self.cfg.baseline, self.cfg.baselines_dir, headers)
        return {m.record["topology"]["name"]: m for m in matches}

    # ---- boot and teardown ----------------------------------------------------------------
    def _boot(self, topology: Topology) -> LiveTopology:
        if self._live and self._live.topology.name == topology.name:
            return self._live
        self.stop_live()
        live = LiveTopology(topology, self.record_for(topology))
        self._live = live
        choice = self.choices[topology.name]
        try:
            if choice.name == "endpoint":
                live.endpoints = self.cfg.endpoints
                live.model = resolve_served_model(self.cfg.endpoints, topology.model.served_name, self.cfg.api_key)
                live.record.data["engine"]["version"] = server_version(self.cfg.endpoints[0], self.cfg.api_key)
            else:
                self._launch(live, choice)
        except Mm27Error as exc:
            live.failure = f"{topology.name}: {exc}"
            live.record.add_error(str(exc))
        return live

    def _launch(self, live: LiveTopology, choice: EngineChoice) -> None:
        topology = live.topology
        engine = choice.engine
        record = live.record
        devices: list[tuple[int, ...]] = []
        kind = engine.device_kind(topology)
        if kind is not None:
            live.lease = lease_devices(engine.devices_needed(topology), kind=kind, owner=f"pytest-mm27 {self.run_id}")
            devices = split_devices(topology, live.lease.devices)
            if kind == "gpu":
                check_free_memory(live.lease.devices)
                live.gpus = tuple(live.lease.devices)
                leased = set(live.lease.devices)
                record.data["hardware"]["gpus"] = [g.to_dict() for g in discover_gpus() if g.index in leased]
        # A generated model ([model] make) is written now; the plan serves its folder.
        topology = engine.prepare(topology, self.options)
        if topology.model.make:
            record.set("model_dir", topology.model.name)
        # Ports 0: the launcher picks free ones and retries once if one is taken meanwhile.
        plan = engine.plan(topology, self.options, (), devices)
        if self.cfg.startup_timeout_s:
            plan = plan.with_startup_timeout(self.cfg.startup_timeout_s)
        record.data["engine"]["version"] = engine.version(self.options)
        live.launcher = Launcher(plan, self.run_dir / "logs")
        started = time.monotonic()
        # The host facts import torch in the engine's environment: read them while the servers boot.
        facts = _Background(lambda: collect_host_facts(live.gpus, self._engine_python(choice)))
        try:
            live.launcher.start()
            live.launcher.wait_healthy()
        finally:
            live.plan = live.launcher.plan
            record.data["host"] = facts.result()
            record.set("launch", live.plan.to_dict())
        record.set("startup_s", round(time.monotonic() - started, 3))
        live.endpoints = live.launcher.endpoints
        live.model = live.plan.model

    def _engine_python(self, choice: EngineChoice) -> str | None:
        if choice.name != "vllm":
            return None
        try:
            return vllm_python(self.cfg.vllm_command)
        except ConfigError:
            return None         # its torch version is then recorded as unreadable

    def stop_live(self, status: str | None = None) -> None:
        live, self._live = self._live, None
        if live is None:
            return
        try:
            if live.launcher is not None:
                report = live.launcher.stop()
                live.record.data["teardown"] = report.to_dict() if hasattr(report, "to_dict") else None
                if getattr(report, "leftovers", None):
                    live.record.add_error(f"teardown left processes or files behind: {report.leftovers}")
        finally:
            if live.lease is not None:
                live.lease.release()
            status = status or ("failed" if live.failure else "complete")
            live.record.finish(status)

    def close(self, interrupted: bool = False) -> None:
        """Stop what runs and close every record; a record that cannot be written
        (disk full, folder gone) is reported after everything else is done."""
        errors: list[str] = []
        live = self._live
        if live and interrupted:
            live.failure = live.failure or "interrupted"
            live.record.data["errors"].append({"at": now_iso(), "concurrency": None,
                                               "message": "interrupted (Ctrl-C or SIGTERM) before the sweep finished"})
        try:
            self.stop_live("interrupted" if interrupted else None)
        except Mm27Error as exc:
            errors.append(str(exc))
        for record in self._records.values():
            if record.data["status"] == "running":
                try:
                    record.finish("interrupted" if interrupted else "incomplete")
                except Mm27Error as exc:
                    errors.append(str(exc))
        if errors:
            raise Mm27Error("; ".join(dict.fromkeys(errors)))

    # ---- measuring ------------------------------------------------------------------------
    def measure(self, topology: Topology, concurrency: int) -> tuple[dict[str, Any], Verdict]:
        """Run one level; returns the level entry written to the record and its verdict."""
        live = self._boot(topology)
        floor = self.floors_for(topology).get(topology.name, self.workloads[topology.name].name, concurrency)
        entry: dict[str, Any] = {"concurrency": concurrency, "floor": floor.tok_s if floor else None,
                                 "floor_metric": floor.metric if floor else None,
                                 "floor_note": floor.note if floor else None}
        if live.failure:
            # Recorded too, so the record lists every level the run meant to measure.
            verdict = Verdict(ERROR, (live.failure,))
            entry |= {"metrics": None, "trials": [], "verdict": verdict.to_dict()}
            live.record.add_level(entry)
            return entry, verdict
        trials: list[dict[str, Any]] = []
        try:
            for _ in range(self.cfg.trials):
                if live.launcher is not None:
                    live.launcher.check_alive()
                trial = self._trial(live, concurrency)
                trials.append(trial)
                metrics = LevelMetrics.from_dict(trial)
                if metrics.failed and metrics.ok == 0:
                    break       # nothing served: more trials would only repeat the failure
            if live.launcher is not None:
                live.launcher.check_alive()
        except Mm27Error as exc:
            message = f"{topology.name} c={concurrency}: {exc}"
            live.failure = message
            live.record.add_error(str(exc), concurrency=concurrency)
            # A server died mid-level (one replica of several, say): the failed
            # requests it caused come first, then which server died and how.
            data = median_trial(trials)
            counted = judge_level(data, floor, self.cfg.max_error_rate).problems if data else ()
            verdict = Verdict(ERROR, (*counted, message))
            entry |= {"metrics": data, "trials": trials, "verdict": verdict.to_dict()}
            live.record.add_level(entry)
            return entry, verdict
        data = median_trial(trials)
        model_error = self._sim_errors.get((topology.name, concurrency)) if self.choices[topology.name].name == "sim" else None
        verdict = judge_level(data, floor, self.cfg.max_error_rate, model_error=model_error,
                              engine=self.choices[topology.name].name)
        entry |= {"metrics": data, "trials": trials, "verdict": verdict.to_dict()}
        live.record.add_level(entry)
        verdict = self._compare_level(live, entry, verdict)
        live.measured.append(concurrency)
        return entry, verdict

    def _trial(self, live: LiveTopology, concurrency: int) -> dict[str, Any]:
        """One measurement of a level, with what the GPUs and the servers' CPUs did meanwhile."""
        pids = live.launcher.pids if live.launcher is not None else {}
        prefix = live.topology.env.get("VLLM_PROCESS_NAME_PREFIX", DEFAULT_TITLE_PREFIX)
        with GpuSampler(live.gpus) as sampler, ServerCpuSampler(pids, title_prefix=prefix) as cpu:
            started = time.time()
            metrics = run_level(live.endpoints, live.model, self.workloads[live.topology.name], concurrency,
                                api_key=self.cfg.api_key, workers=self.cfg.workers,
                                level_timeout_s=self.cfg.level_timeout_s, precision=self.cfg.precision,
                                max_window_s=self.cfg.max_window_s)
            ended = time.time()
        trial = metrics.to_dict()
        # Energy over the whole level, warm-up and tail requests included: they ran on the same GPUs.
        telemetry = sampler.summary(metrics.output_tokens + int(metrics.unmeasured.get("output_tokens") or 0))
        if telemetry is not None:
            trial["gpu"] = telemetry
        if pids:
            start, end = metrics.window_wall or (started, ended)
            shares = cpu.shares(start, end)
            trial["server_cpu"] = {name: share.to_dict() for name, share in shares.items()}
            trial["front_end_bound"], trial["front_end_reason"] = front_end_bound(shares)
        return trial

    def _compare_level(self, live: LiveTopology, entry: dict[str, Any], verdict: Verdict) -> Verdict:
        """Gate the level against its baseline (when one is given) and record how."""
        match = self.baselines.get(live.topology.name)
        if match is None or match.baseline is None:
            return verdict
        comparison = compare_records(match.baseline, live.record.data, self.cfg.tolerances or None,
                                     max_error_rate=self.cfg.max_error_rate, baseline_path=match.path)
        level = comparison.level(entry["concurrency"])
        if level is None:
            return verdict
        entry["comparison"] = level.to_dict()
        regressions = tuple(m.message for m in level.metrics if m.status == REGRESSED)
        if regressions:
            verdict = Verdict(FAIL, verdict.problems + regressions, verdict.notes, verdict.tag)
            entry["verdict"] = verdict.to_dict()
        live.record.add_level(entry)
        return verdict

    @property
    def records(self) -> list[RunRecord]:
        return list(self._records.values())


class _Background:
    """A call run in a daemon thread; ``result()`` waits for it (and re-raises what it raised)."""

    def __init__(self, fn: Callable[[], Any]):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="mm27-background", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def median_trial(trials: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial whose output tok/s is the median: floors are judged on a real trial."""
    if not trials:
        return None
    ranked = sorted(trials, key=lambda t: t.get("output_tok_s") or 0.0)
    return ranked[(len(ranked) - 1) // 2]


def _get_json(url: str, api_key: str | None, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - user-given http(s) URL
        return json.loads(resp.read().decode("utf-8"))


def resolve_served_model(endpoints: Sequence[str], wanted: str, api_key: str | None) -> str:
    """The model name to send: the topology's if served, else the only one served."""
    try:
        models = [m["id"] for m in _get_json(f"{endpoints[0]}/v1/models", api_key)["data"]]
    except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError) as exc:
        raise LaunchError(f"endpoint {endpoints[0]} did not answer GET /v1/models: {exc}") from exc
    if wanted in models:
        return wanted
    if len(models) == 1:
        return models[0]
    raise ConfigError(f"endpoint {endpoints[0]} serves {models}, not {wanted!r}; "
                      "set the topology's model.served_name", field="model.served_name")


def server_version(endpoint: str, api_key: str | None) -> str | None:
    try:
        return str(_get_json(f"{endpoint}/version", api_key).get("version"))
    except (OSError, urllib.error.URLError, ValueError, AttributeError):
        return None
