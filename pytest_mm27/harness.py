"""The run's sequence: choose engines, boot a topology, measure and gate levels, keep records.

No pytest imports. The plugin asks for one (topology, concurrency) at a time;
the harness keeps at most one topology alive, boots it on first use through
its engine and the launcher (the same path for vLLM, the simulator and
endpoints: a plan, a lease, servers started or not), measures each level
with the load generator while the host samplers watch, gates it
(``gate.step.gate_level``), writes the record after every level and tears
everything down on close().
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog.floors import Floor, FloorTable, load_floors
from .catalog.paths import catalog_dirs
from .catalog.topology import Topology, load_catalog
from .catalog.workload import Workload, load_workloads
from .config import Mm27Config
from .engines import Engine, select_engine
from .engines.base import EngineOptions, split_devices
from .engines.vllm import vllm_python
from .errors import ConfigError, Mm27Error
from .gate.baseline import BaselineMatch, resolve_baselines
from .gate.compare import Judge
from .gate.step import gate_level
from .gate.verdict import judge_level
from .host.gpus import check_free_memory, discover_gpus
from .host.leases import lease_devices
from .host.hostfacts import collect_host_facts
from .host.launcher import Launcher
from .host.servercpu import DEFAULT_TITLE_PREFIX, ServerCpuSampler, front_end_bound
from .host.telemetry import GpuSampler
from .loadgen import run_level
from .records.model import (
    ERROR, EngineInfo, FloorRef, HardwareInfo, LevelResult, RunError, RunRecord, Trial, Verdict,
)
from .records.store import RunFile, check_writable_dir, git_commit, new_run_id, now_iso
from .secrets import add_secret


@dataclass
class EngineChoice:
    engine: Engine
    reason: str          # said in the first line of output

    @property
    def name(self) -> str:
        return self.engine.name


@dataclass
class LiveTopology:
    topology: Topology
    file: RunFile
    launcher: Launcher | None = None
    lease: Any = None
    endpoints: tuple[str, ...] = ()
    model: str = ""
    failure: str | None = None      # once set, every later level of this topology errors with it
    gpus: tuple[int, ...] = ()      # leased GPUs, sampled for telemetry during each level

    @property
    def record(self) -> RunRecord:
        return self.file.record


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
            sim_args=cfg.sim_args(), seed=cfg.seed, endpoints=cfg.endpoints,
        )
        self.choices: dict[str, EngineChoice] = {}
        # Topologies taken in by `--topology all` that no engine here can run
        # (a CPU vLLM one without vLLM): left out with the reason, not fatal.
        self.not_run: dict[str, str] = {}
        for topology in self.topologies:
            try:
                self.choices[topology.name] = EngineChoice(*select_engine(cfg.engine, topology, self.options))
            except ConfigError as exc:
                if "all" not in cfg.topologies:
                    raise
                self.not_run[topology.name] = getattr(exc, "reason", str(exc))
        self.topologies = [t for t in self.topologies if t.name in self.choices]
        self._live: LiveTopology | None = None
        self._files: dict[str, RunFile] = {}
        self._git = git_commit(rootdir)
        self.baselines: dict[str, BaselineMatch] = self._resolve_baselines()
        # One judge per baseline: its noise is the baseline's, so every level is judged alike.
        self.judges: dict[str, Judge] = {
            name: Judge.of(m.reference, self.workloads[name].to_dict(), cfg.tolerances or None,
                           max_error_rate=cfg.max_error_rate)
            for name, m in self.baselines.items() if m.reference is not None}
        for topology in self.topologies:        # a broken floors file is bad input: refuse it now
            self.floors_for(topology)

    # ---- selection, before anything boots -------------------------------------------------
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

    def floor_for(self, topology: Topology, concurrency: int) -> Floor | None:
        return self.floors_for(topology).get(topology.name, self.workloads[topology.name].name, concurrency)

    def floor_value(self, topology: Topology, concurrency: int) -> float | None:
        floor = self.floor_for(topology, concurrency)
        return floor.tok_s if floor else None

    # ---- records ------------------------------------------------------------------------------
    def _header(self, topology: Topology) -> RunRecord:
        choice = self.choices[topology.name]
        return RunRecord(
            run_id=self.run_id, git_commit=self._git,
            engine=EngineInfo(choice.name, None, choice.reason),
            host=dict(collect_host_facts()),
            hardware=HardwareInfo(topology.hardware, choice.name == "sim"),
            topology=topology.to_dict(), workload=self.workloads[topology.name].to_dict(),
            options={"max_error_rate": self.cfg.max_error_rate, "trials": self.cfg.trials,
                     "concurrency_override": list(self.cfg.concurrency or ()),
                     "sim_faults": dict(self.cfg.sim_faults)},
            # Under pytest-xdist each worker sweeps whole topologies; they may run side by side.
            parallel={"xdist_worker": os.environ.get("PYTEST_XDIST_WORKER"),
                      "xdist_workers": int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)},
        )

    def file_for(self, topology: Topology) -> RunFile:
        if topology.name not in self._files:
            record = self._header(topology)
            match = self.baselines.get(topology.name)
            if match is not None:
                record.baseline = {"path": str(match.path) if match.path else None, "note": match.note}
            self._files[topology.name] = RunFile(self.run_dir / f"{topology.name}.json", record)
            self._files[topology.name].save()
        return self._files[topology.name]

    def _resolve_baselines(self) -> dict[str, BaselineMatch]:
        """Find (auto) or load and check (PATH) baselines before anything boots."""
        if not self.cfg.baseline:
            return {}
        headers = [self._header(t).to_dict() for t in self.topologies]
        matches = resolve_baselines(self.cfg.baseline, self.cfg.baselines_dir, headers)
        return {m.record["topology"]["name"]: m for m in matches}

    # ---- boot and teardown ----------------------------------------------------------------
    def _boot(self, topology: Topology) -> LiveTopology:
        if self._live and self._live.topology.name == topology.name:
            return self._live
        self.stop_live()
        live = LiveTopology(topology, self.file_for(topology))
        self._live = live
        try:
            self._launch(live, self.choices[topology.name].engine)
        except Mm27Error as exc:
            live.failure = f"{topology.name}: {exc}"
            live.file.add_error(str(exc))
        return live

    def _launch(self, live: LiveTopology, engine: Engine) -> None:
        """Lease devices, prepare, plan, start and wait until healthy: the same for every engine."""
        topology, record = live.topology, live.record
        devices: list[tuple[int, ...]] = []
        kind = engine.device_kind(topology)
        if kind is not None:
            live.lease = lease_devices(engine.devices_needed(topology), kind=kind, owner=f"pytest-mm27 {self.run_id}")
            devices = split_devices(topology, live.lease.devices)
            if kind == "gpu":
                check_free_memory(live.lease.devices)
                live.gpus = tuple(live.lease.devices)
                leased = set(live.lease.devices)
                record.hardware.gpus = [g.to_dict() for g in discover_gpus() if g.index in leased]
        # A generated model ([model] make) is written now, an endpoint's served model asked for.
        topology = engine.prepare(topology, self.options)
        if topology.model.make:
            record.model_dir = topology.model.name
        # Ports 0: the launcher picks free ones and retries once if one is taken meanwhile.
        plan = engine.plan(topology, self.options, devices=devices)
        if self.cfg.startup_timeout_s:
            plan = plan.with_startup_timeout(self.cfg.startup_timeout_s)
        record.engine.version = engine.version(self.options)
        live.launcher = Launcher(plan, self.run_dir / "logs")
        started = time.monotonic()
        # The host facts import torch in the engine's environment: read them while the servers boot.
        facts = _Background(lambda: collect_host_facts(live.gpus, self._engine_python(engine)))
        try:
            live.launcher.start()
            live.launcher.wait_healthy()
        finally:
            record.host = dict(facts.result())
            # what was started: nothing, for an endpoint's plan
            record.launch = live.launcher.plan.to_dict() if live.launcher.plan.servers else None
            live.file.save()
        record.startup_s = round(time.monotonic() - started, 3)
        live.file.save()
        live.endpoints = live.launcher.endpoints
        live.model = live.launcher.plan.model

    def _engine_python(self, engine: Engine) -> str | None:
        if engine.name != "vllm":
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
                live.record.teardown = report.to_dict()
                if report.leftovers:
                    live.file.add_error(f"teardown left processes or files behind: {report.leftovers}")
        finally:
            if live.lease is not None:
                live.lease.release()
            live.file.finish(status or ("failed" if live.failure else "complete"))

    def close(self, interrupted: bool = False) -> None:
        """Stop what runs and close every record; a record that cannot be written
        (disk full, folder gone) is reported after everything else is done."""
        errors: list[str] = []
        live = self._live
        if live and interrupted:
            live.failure = live.failure or "interrupted"
            live.record.errors.append(RunError("interrupted (Ctrl-C or SIGTERM) before the sweep finished", now_iso()))
        try:
            self.stop_live("interrupted" if interrupted else None)
        except Mm27Error as exc:
            errors.append(str(exc))
        for file in self._files.values():
            if file.record.status == "running":
                try:
                    file.finish("interrupted" if interrupted else "incomplete")
                except Mm27Error as exc:
                    errors.append(str(exc))
        if errors:
            raise Mm27Error("; ".join(dict.fromkeys(errors)))

    # ---- measuring ------------------------------------------------------------------------
    def measure(self, topology: Topology, concurrency: int) -> LevelResult:
        """Run one level, gate it, and record it; returns the level as recorded."""
        live = self._boot(topology)
        floor = self.floor_for(topology, concurrency)
        level = LevelResult(concurrency, floor=FloorRef(floor.tok_s, floor.metric, floor.note) if floor else None)
        if live.failure:
            # Recorded too, so the record lists every level the run meant to measure.
            level.verdict = Verdict(ERROR, (live.failure,))
            live.file.add_level(level)
            return level
        try:
            for _ in range(self.cfg.trials):
                if live.launcher is not None:
                    live.launcher.check_alive()
                level.trials.append(self._trial(live, concurrency))
                if level.trials[-1].failed and level.trials[-1].ok == 0:
                    break       # nothing served: more trials would only repeat the failure
            if live.launcher is not None:
                live.launcher.check_alive()
        except Mm27Error as exc:
            message = f"{topology.name} c={concurrency}: {exc}"
            live.failure = message
            live.file.add_error(str(exc), concurrency=concurrency)
            # A server died mid-level (one replica of several, say): the failed
            # requests it caused come first, then which server died and how.
            counted = judge_level(level.metrics, floor, self.cfg.max_error_rate).problems if level.trials else ()
            level.verdict = Verdict(ERROR, (*counted, message))
            live.file.add_level(level)
            return level
        engine = self.choices[topology.name].engine
        baseline = self.baselines.get(topology.name)
        reference = baseline.reference if baseline is not None else None
        gated = gate_level(level, floor, reference.level(concurrency) if reference else None,
                           self.judges.get(topology.name), max_error_rate=self.cfg.max_error_rate,
                           model_error=engine.known_error(topology, concurrency), engine=engine.name)
        level.verdict, level.comparison = gated.verdict, gated.comparison
        live.file.add_level(level)
        return level

    def _trial(self, live: LiveTopology, concurrency: int) -> Trial:
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
        # Energy over the whole level, warm-up and tail requests included: they ran on the same GPUs.
        trial = Trial.of(metrics, gpu=sampler.summary(metrics.output_tokens
                                                      + int(metrics.unmeasured.get("output_tokens") or 0)))
        if pids:
            start, end = metrics.window_wall or (started, ended)
            shares = cpu.shares(start, end)
            trial.server_cpu = {name: share.to_dict() for name, share in shares.items()}
            trial.front_end_bound, trial.front_end_reason = front_end_bound(shares)
        return trial


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
