"""The run's sequence: deployments booted on first use, levels measured and gated, records kept.

No pytest imports. A :class:`Deployment` is a topology (from the catalog or
built in code, with overrides) on an engine; the plugin's suite declares one
per ``--topology``, tests declare their own through the plugin's fixture
factory. The harness keeps at most one deployment alive (booting another
stops the first, so they never share GPUs), boots through the engine and the
launcher (the same path for vLLM, the simulator and endpoints), measures each
level with the load generator while the host samplers watch, gates it
(``gate.step.gate_level``), writes the record after every level and tears
everything down on close().
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .catalog.floors import Floor, FloorTable, load_floors
from .catalog.paths import catalog_dirs
from .catalog.topology import Catalog, ModelRef, Topology, load_catalog
from .catalog.trace import load_trace
from .catalog.workload import Workload, load_workloads
from .config import Mm27Config
from .deployment import Deployment, EngineChoice, LiveDeployment
from .engines import Engine, select_engine
from .engines.base import EngineOptions, split_devices
from .engines.endpoint import served_model
from .engines.vllm import vllm_python
from .errors import ConfigError, Mm27Error
from .gate.baseline import BaselineMatch, resolve_baselines, resolve_one
from .gate.compare import Judge
from .gate.slo import Slo
from .gate.step import gate_level
from .gate.verdict import judge_level
from .host.background import Background
from .host.gpus import check_free_memory, discover_gpus
from .host.hostfacts import collect_host_facts
from .host.launcher import Launcher
from .host.leases import lease_devices
from .host.servercpu import DEFAULT_TITLE_PREFIX, ServerCpuSampler, front_end_bound
from .host.telemetry import GpuSampler
from .loadgen import run_level
from .loadgen.goodput import saturation, search_rate
from .progress import Progress, Silent
from .records.model import (
    ERROR,
    FAIL,
    EngineInfo,
    FloorRef,
    HardwareInfo,
    LevelResult,
    RunError,
    RunRecord,
    Trial,
    Verdict,
)
from .records.samples import write_samples
from .records.store import RunFile, check_writable_dir, git_commit, new_run_id, now_iso
from .result import Result
from .secrets import add_secret

# An endpoint run without --topology sweeps these unless --concurrency says otherwise.
ENDPOINT_LEVELS = (1, 4, 16, 64)


class Harness:
    def __init__(self, cfg: Mm27Config, rootdir: Path, run_id: str | None = None,
                 progress: Progress | None = None):
        self.cfg = cfg
        self.rootdir = rootdir
        self.run_id = run_id or new_run_id()
        self.run_dir = cfg.results_dir / "runs" / self.run_id
        self.progress: Progress = progress or Silent()
        add_secret(cfg.api_key)                 # never written to records, baselines or reports
        check_writable_dir(cfg.results_dir)     # a bad --results-dir fails now, before anything boots
        self.catalog: Catalog = load_catalog([*cfg.topology_dirs, *catalog_dirs("topologies")])
        self._workloads = load_workloads([*cfg.workload_dirs, *catalog_dirs("workloads")])
        if cfg.workload:
            self.workload_named(cfg.workload)   # an unknown --workload fails now
        self._floor_dirs = [*cfg.floor_dirs, *catalog_dirs("floors")]
        self._floors: dict[str, FloorTable] = {}
        self.options = EngineOptions(
            host=cfg.host, api_key=cfg.api_key, vllm_command=cfg.vllm_command,
            sim_args=cfg.sim_args(), seed=cfg.seed, endpoints=cfg.endpoints, cluster=bool(cfg.ray_address),
        )
        self.deployments: dict[str, Deployment] = {}
        # Topologies taken in by `--topology all` that no engine here can run
        # (a CPU vLLM one without vLLM): left out with the reason, not fatal.
        self.not_run: dict[str, str] = {}
        for topology in self._selected():
            try:
                self.declare(topology)
            except ConfigError as exc:
                if "all" not in cfg.topologies:
                    raise
                self.not_run[topology.name] = getattr(exc, "reason", str(exc))
        self.topologies: list[Topology] = [d.topology for d in self.deployments.values()]
        self._live: LiveDeployment | None = None
        self._files: dict[tuple[str, str], RunFile] = {}
        self._sweeps: dict[tuple[str, Workload], dict[float, Any]] = {}     # rate levels measured, per sweep
        self._git = git_commit(rootdir)
        self.baselines: dict[tuple[str, str], BaselineMatch] = self._resolve_baselines()
        self._judges: dict[tuple[str, str], Judge | None] = {}

    # ---- what runs, decided before anything boots ---------------------------------------
    def _selected(self) -> list[Topology]:
        """The suite's topologies: --topology, or for an endpoint alone the one it serves."""
        cfg = self.cfg
        if cfg.engine == "endpoint":
            if not cfg.topologies_given:
                return [self._endpoint_topology()]
            chosen = self.catalog.select(cfg.topologies)
            if len(chosen) != 1:
                raise ConfigError("an endpoint is one deployment: give one --topology NAME to label it, "
                                  f"not {len(chosen)} ({', '.join(t.name for t in chosen)})", field="--topology")
            return chosen
        return self.catalog.select(cfg.topologies)

    def _endpoint_topology(self) -> Topology:
        """An endpoint given alone is named after the model it serves, on --hardware (else "unknown")."""
        served = served_model(self.cfg.endpoints[0], "", self.cfg.api_key)
        name = re.sub(r"[^A-Za-z0-9._+-]+", "-", served.rsplit("/", 1)[-1]).strip("-") or "endpoint"
        return Topology(
            name=name, description=f"{served} at {', '.join(self.cfg.endpoints)}", source=Path("<endpoint>"),
            hardware=self.cfg.hardware or "unknown", model=ModelRef(served, served, None, None),
            tensor_parallel=0, data_parallel=0, dp_mode="native", gpus=0, max_num_seqs=0,
            gpu_memory_utilization=0.0, max_model_len=0, vllm_args=(), env={},
            concurrency_levels=ENDPOINT_LEVELS, startup_timeout_s=0.0, engines=("endpoint",),
        )

    def declare(self, topology: str | Topology, *, name: str | None = None, engine: str | None = None,
                serve_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                hardware: str | None = None, workload: str | None = None) -> Deployment:
        """A deployment of ``topology`` (a catalog name or a Topology), checked now, booted on first use.

        Overrides make a variant: extra vLLM ``serve_args`` and ``env``, another
        ``engine``, ``hardware`` profile or default ``workload``; give such a
        variant its own ``name`` so its records and baselines stay apart.
        """
        base = self.catalog.get(topology) if isinstance(topology, str) else topology
        changes: dict[str, Any] = {}
        if name:
            changes["name"] = name
        if serve_args:
            changes["vllm_args"] = (*base.vllm_args, *serve_args)
        if env:
            changes["env"] = {**base.env, **env}
        if hardware or self.cfg.hardware:
            # The box differs from the topology's reference: floors, baselines and the simulator use this profile.
            changes["hardware"] = hardware or self.cfg.hardware
        if workload:
            self.workload_named(workload)
            changes["workload"] = workload
        declared = dataclasses.replace(base, **changes) if changes else base
        existing = self.deployments.get(declared.name)
        if existing is not None:
            if existing.topology != declared:
                raise ConfigError(f"two deployments are named {declared.name!r} with different settings; "
                                  "give one of them another name", field="name")
            return existing
        choice = EngineChoice(*select_engine(engine or self.cfg.engine, declared, self.options))
        self.floors_for(declared)                # a broken floors file is bad input: refuse it now
        self.workload_named(self.cfg.workload or declared.workload)
        deployment = Deployment(self, declared, choice)
        self.deployments[declared.name] = deployment
        return deployment

    def workload_named(self, name: str) -> Workload:
        return self._workloads.get(name)

    @property
    def workloads(self) -> dict[str, Workload]:
        """Each suite topology's default workload."""
        return {name: d.workload for name, d in self.deployments.items()}

    def engine_line(self) -> str:
        reasons = list(dict.fromkeys(d.choice.reason for d in self.deployments.values()))
        if len(reasons) == 1:
            line = f"engine: {reasons[0]}"
        else:
            line = "engine: " + "; ".join(f"{name}: {d.choice.reason}" for name, d in self.deployments.items())
        by_reason: dict[str, list[str]] = {}
        for name, why in self.not_run.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            line += f"\nmm27: not run here: {', '.join(names)} ({why})"
        if self.cfg.ray_address:
            line += f"\nmm27: placement: the Ray cluster at {self.cfg.ray_address} (a placement group per server)"
        return line

    def levels_for(self, topology: Topology) -> tuple[int, ...]:
        return self.cfg.concurrency or topology.concurrency_levels

    def cases_for(self, topology: Topology) -> list[tuple[int, float | None, bool]]:
        """The suite's levels of a topology: (concurrency, None, False) each; for a rate sweep
        (--rate, or the workload's arrival.rates) (the in-flight cap, rate, False) each; for a
        trace or a fixed rate the one level (cap, None, False); then (cap, None, True) for the
        rate search of a workload with [slo.search]."""
        workload = self.deployments[topology.name].workload
        arrival = workload.arrival
        rates = self.cfg.rates or (arrival.rates if arrival.kind != "trace" else ())
        if rates:
            cases: list[tuple[int, float | None, bool]] = [(arrival.cap, r, False) for r in rates]
        elif arrival.open:      # a trace, or one fixed rate: one level at the arrival's own cap
            cases = [(arrival.cap, None, False)]
        else:
            cases = [(c, None, False) for c in self.levels_for(topology)]
        if workload.slo is not None and workload.slo.search is not None and arrival.kind != "trace":
            cases.append((arrival.cap, None, True))
        return cases

    @staticmethod
    def rate_shape(workload: Workload, rate: float | None) -> dict[str, Any]:
        """The level fields of a rate level: the rate, and Poisson arrivals for a closed-loop workload."""
        if rate is None:
            return {}
        return {"rate": rate} if workload.arrival.open else {"rate": rate, "arrival_kind": "poisson"}

    def floors_for(self, topology: Topology) -> FloorTable:
        if topology.hardware not in self._floors:
            self._floors[topology.hardware] = load_floors(self._floor_dirs, topology.hardware)
        return self._floors[topology.hardware]

    def floor_for(self, topology: Topology, workload: str, concurrency: int) -> Floor | None:
        return self.floors_for(topology).get(topology.name, workload, concurrency)

    def floor_value(self, topology: Topology, concurrency: int, workload: str | None = None) -> float | None:
        floor = self.floor_for(topology, workload or self.deployments[topology.name].workload.name, concurrency)
        return floor.tok_s if floor else None

    def ceilings_for(self, topology: Topology, workload: str, concurrency: int) -> tuple[Slo, ...]:
        return tuple(Slo.of(c) for c in self.floors_for(topology).ceilings_for(topology.name, workload, concurrency))

    # ---- records and baselines ----------------------------------------------------------------
    def _header(self, deployment: Deployment, workload: Workload) -> RunRecord:
        topology = deployment.topology
        return RunRecord(
            run_id=self.run_id, git_commit=self._git,
            engine=EngineInfo(deployment.engine, None, deployment.choice.reason),
            host=dict(collect_host_facts()),
            hardware=HardwareInfo(topology.hardware, deployment.engine == "sim"),
            topology=topology.to_dict(), workload=workload.to_dict(),
            options={"max_error_rate": self.cfg.max_error_rate, "trials": self.cfg.trials,
                     "concurrency_override": list(self.cfg.concurrency or ()),
                     "sim_faults": dict(self.cfg.sim_faults)},
            # Under pytest-xdist each worker sweeps whole topologies; they may run side by side.
            parallel={"xdist_worker": os.environ.get("PYTEST_XDIST_WORKER"),
                      "xdist_workers": int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)},
        )

    def file_for(self, deployment: Deployment, workload: Workload) -> RunFile:
        """One record per (deployment, workload): ``<name>.json`` for its own workload, else ``<name>--<workload>``."""
        key = (deployment.name, workload.name)
        if key not in self._files:
            record = self._header(deployment, workload)
            match = self.baseline_for(deployment, workload)
            if match is not None:
                record.baseline = {"path": str(match.path) if match.path else None, "note": match.note}
            own = workload.name == deployment.workload.name
            stem = deployment.name if own else f"{deployment.name}--{re.sub(r'[^A-Za-z0-9._+=,-]', '_', workload.name)}"
            self._files[key] = RunFile(self.run_dir / f"{stem}.json", record)
            self._files[key].save()
        return self._files[key]

    def _resolve_baselines(self) -> dict[tuple[str, str], BaselineMatch]:
        """Find (auto) or load and check (PATH) the suite's baselines before anything boots."""
        if not self.cfg.baseline:
            return {}
        headers = [self._header(d, d.workload).to_dict() for d in self.deployments.values()]
        matches = resolve_baselines(self.cfg.baseline, self.cfg.baselines_dir, headers)
        return {(m.record["topology"]["name"], m.record["workload"]["name"]): m for m in matches}

    def baseline_for(self, deployment: Deployment, workload: Workload) -> BaselineMatch | None:
        if not self.cfg.baseline:
            return None
        key = (deployment.name, workload.name)
        if key not in self.baselines:
            self.baselines[key] = resolve_one(self.cfg.baseline, self.cfg.baselines_dir,
                                              self._header(deployment, workload).to_dict())
        return self.baselines[key]

    def _judge(self, deployment: Deployment, workload: Workload) -> Judge | None:
        """One judge per baseline: its noise is the baseline's, so every level is judged alike."""
        key = (deployment.name, workload.name)
        if key not in self._judges:
            match = self.baseline_for(deployment, workload)
            reference = match.reference if match is not None else None
            self._judges[key] = None if reference is None else Judge.of(
                reference, workload.to_dict(), self.cfg.tolerances or None, max_error_rate=self.cfg.max_error_rate)
        return self._judges[key]

    # ---- boot and teardown ----------------------------------------------------------------
    def boot(self, deployment: Deployment) -> LiveDeployment:
        """The deployment up (booted now if another one, or none, is up)."""
        if self._live and self._live.deployment is deployment:
            return self._live
        self.stop_live()
        live = LiveDeployment(deployment)
        self._live = live
        try:
            self._launch(live)
        except Mm27Error as exc:
            live.failure = f"{deployment.name}: {exc}"
        finally:
            self.progress.done()
        return live

    def _launch(self, live: LiveDeployment) -> None:
        """Lease devices, prepare, plan, start and wait until healthy: the same for every engine."""
        deployment = live.deployment
        topology, engine = deployment.topology, deployment.choice.engine
        devices: list[tuple[int, ...]] = []
        kind = engine.device_kind(topology)
        on_ray = bool(self.cfg.ray_address) and engine.name != "endpoint"
        if on_ray and kind is not None:
            # The devices come from Ray's resources on the nodes: nothing is leased on this host.
            # Placeholders keep the plan's shape; the Ray launcher puts in the ids Ray gives each server.
            per = topology.gpus_per_server
            devices = [tuple(range(i * per, (i + 1) * per)) for i in range(topology.replicas)]
        elif kind is not None:
            live.lease = lease_devices(engine.devices_needed(topology), kind=kind, owner=f"pytest-mm27 {self.run_id}")
            devices = split_devices(topology, live.lease.devices)
            if kind == "gpu":
                check_free_memory(live.lease.devices)
                live.gpus = tuple(live.lease.devices)
        # A generated model ([model] make) is written now, an endpoint's served model asked for.
        prepared = engine.prepare(topology, self.options)
        # Ports 0: the launcher picks free ones and retries once if one is taken meanwhile.
        plan = engine.plan(prepared, self.options, devices=devices)
        if self.cfg.startup_timeout_s:
            plan = plan.with_startup_timeout(self.cfg.startup_timeout_s)
        version = engine.version(self.options)
        if on_ray and plan.servers:
            from .cluster.launcher import RayLauncher
            assert self.cfg.ray_address is not None
            live.launcher = RayLauncher(plan, self.run_dir / "logs", self.cfg.ray_address, run_id=self.run_id)
        else:
            live.launcher = Launcher(plan, self.run_dir / "logs")
        started = time.monotonic()
        # The host facts import torch in the engine's environment: read them while the servers boot.
        facts = Background(lambda: collect_host_facts(live.gpus, self._engine_python(engine)))
        try:
            live.launcher.start()
            live.launcher.wait_healthy(lambda elapsed, timeout, line: self.progress.booting(
                deployment.name, elapsed, timeout, line))
        finally:
            self._booted = {
                "host": dict(facts.result()), "version": version, "startup_s": round(time.monotonic() - started, 3),
                # what was started: nothing, for an endpoint's plan
                "launch": _launch_record(live.launcher, self.cfg.ray_address),
                "model_dir": prepared.model.name if prepared.model.make else None,
                "gpus": [g.to_dict() for g in discover_gpus() if g.index in set(live.gpus)] if live.gpus else [],
            }
            for file in self._files_of(deployment):
                self._stamp(file)
        live.endpoints = live.launcher.endpoints
        live.model = live.launcher.plan.model

    def _files_of(self, deployment: Deployment) -> list[RunFile]:
        return [f for (name, _), f in self._files.items() if name == deployment.name]

    def _stamp(self, file: RunFile) -> None:
        """What the boot found, written into a record of the deployment (one made later gets it too)."""
        booted = getattr(self, "_booted", None)
        if booted is None or file.record.startup_s is not None:
            return
        record = file.record
        record.host, record.engine.version = booted["host"], booted["version"]
        record.launch, record.startup_s, record.model_dir = booted["launch"], booted["startup_s"], booted["model_dir"]
        record.hardware.gpus = booted["gpus"]
        file.save()

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
        files = self._files_of(live.deployment)
        try:
            if live.launcher is not None:
                report = live.launcher.stop()
                for file in files:
                    file.record.teardown = report.to_dict()
                    if report.leftovers:
                        file.add_error(f"teardown left processes or files behind: {report.leftovers}")
        finally:
            self._booted = None
            if live.lease is not None:
                live.lease.release()
            for file in files:
                file.finish(status or ("failed" if live.failure else "complete"))

    def close(self, interrupted: bool = False) -> None:
        """Stop what runs and close every record; a record that cannot be written
        (disk full, folder gone) is reported after everything else is done."""
        errors: list[str] = []
        live = self._live
        if live and interrupted:
            live.failure = live.failure or "interrupted"
            for file in self._files_of(live.deployment):
                file.record.errors.append(RunError("interrupted (Ctrl-C or SIGTERM) before the sweep finished",
                                                   now_iso()))
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
    def measure(self, topology: Topology, concurrency: int) -> Result:
        """The suite's level: the topology's deployment at ``concurrency``, on its own workload."""
        return self.deployments[topology.name].run(concurrency)

    def measure_level(self, deployment: Deployment, concurrency: int, workload: Workload, *,
                      trials: int | None = None, case: str | None = None) -> LevelResult:
        """Run one level, gate it, and record it; returns the level as recorded."""
        file = self.file_for(deployment, workload)
        live = self.boot(deployment)
        self._stamp(file)
        if live.failure and not any(e.message == live.failure.split(": ", 1)[-1] for e in file.record.errors):
            file.add_error(live.failure.split(": ", 1)[-1])
        topology = deployment.topology
        floor = self.floor_for(topology, workload.name, concurrency)
        level = LevelResult(concurrency, floor=FloorRef(floor.tok_s, floor.metric, floor.note) if floor else None,
                            case=case)
        if live.failure:
            # Recorded too, so the record lists every level the run meant to measure.
            level.verdict = Verdict(ERROR, (live.failure,))
            file.add_level(level)
            return level
        try:
            slug = re.sub(r"[^A-Za-z0-9._=,+-]", "_", f"c{concurrency}" + (f"-{case}" if case else ""))
            for k in range(trials or self.cfg.trials):
                if live.launcher is not None:
                    live.launcher.check_alive()
                level.trials.append(self._trial(live, workload, concurrency,
                                                file.path.parent / f"{file.path.stem}.samples" / f"{slug}-t{k + 1}"))
                if level.trials[-1].failed and level.trials[-1].ok == 0:
                    break       # nothing served: more trials would only repeat the failure
            if live.launcher is not None:
                live.launcher.check_alive()
        except Mm27Error as exc:
            message = f"{deployment.name} c={concurrency}: {exc}"
            live.failure = message
            file.add_error(str(exc), concurrency=concurrency)
            # A server died mid-level (one replica of several, say): the failed
            # requests it caused come first, then which server died and how.
            counted = judge_level(level.metrics, floor, self.cfg.max_error_rate).problems if level.trials else ()
            level.verdict = Verdict(ERROR, (*counted, message))
            file.add_level(level)
            return level
        finally:
            self.progress.done()
        self._mark_saturation(deployment, workload, level)
        engine = deployment.choice.engine
        match = self.baseline_for(deployment, workload)
        reference = match.reference if match is not None else None
        gated = gate_level(level, floor, reference.level(concurrency, case) if reference else None,
                           self._judge(deployment, workload), max_error_rate=self.cfg.max_error_rate,
                           model_error=engine.known_error(topology, concurrency), engine=engine.name,
                           ceilings=self.ceilings_for(topology, workload.name, concurrency))
        level.verdict, level.comparison = gated.verdict, gated.comparison
        file.add_level(level)
        return level

    def _ray_level(self, live: LiveDeployment, workload: Workload, concurrency: int) -> Any:
        """The level's load from Ray actors on the cluster's nodes (--ray-load-workers)."""
        from .loadgen.ray_workers import run_level_on_ray
        assert self.cfg.ray_address and self.cfg.ray_load_workers
        return run_level_on_ray(live.endpoints, live.model, workload, concurrency, address=self.cfg.ray_address,
                                nodes=min(self.cfg.ray_load_workers, concurrency), api_key=self.cfg.api_key,
                                level_timeout_s=self.cfg.level_timeout_s)

    def search_level(self, deployment: Deployment, workload: Workload, *, case: str | None = None) -> LevelResult:
        """The highest rate whose SLO attainment holds ``[slo.search]``'s target, by bisection.

        Every probe is a rate level of its own (recorded as ``workload[rate=R]``,
        case ``rate-search``); the search's answer is a level of
        ``workload[rate-search]`` whose ``max_good_rate`` is that rate (0 when
        not even ``min_rate`` held), with the best probe's figures, gated by
        floors (metric = "max_good_rate" or "goodput_tok_s") and the baseline.
        """
        search = workload.slo.search if workload.slo else None
        if search is None:
            raise ConfigError(f"workload {workload.name} has no [slo.search] table", source=str(workload.source),
                              field="slo.search")
        cap = workload.arrival.cap
        probe_case = f"{case}@rate-search" if case else "rate-search"

        def measure(rate: float) -> Any:
            probe = workload.variant(**self.rate_shape(workload, rate))
            level = self.measure_level(deployment, cap, probe, trials=1, case=probe_case)
            if level.metrics is None or level.verdict.status == ERROR:
                raise Mm27Error(f"rate search probe at {rate:g} req/s: {level.verdict.message}")
            return level.metrics

        named = dataclasses.replace(workload, name=f"{workload.name}[rate-search]")
        file = self.file_for(deployment, named)
        floor = self.floor_for(deployment.topology, named.name, cap)
        level = LevelResult(cap, floor=FloorRef(floor.tok_s, floor.metric, floor.note) if floor else None, case=case)
        try:
            found = search_rate(measure, search)
        except Mm27Error as exc:
            level.verdict = Verdict(ERROR, (str(exc),))
            file.add_level(level)
            return level
        trial = Trial.of(found.best) if found.best is not None else Trial.of(found.last) if found.last else None
        if trial is None:
            level.verdict = Verdict(ERROR, ("the rate search measured nothing",))
            file.add_level(level)
            return level
        trial.max_good_rate = found.rate or 0.0
        trial.rate_search = found.to_dict()
        level.trials.append(trial)
        match = self.baseline_for(deployment, named)
        reference = match.reference if match is not None else None
        gated = gate_level(level, floor, reference.level(cap, case) if reference else None,
                           self._judge(deployment, named), max_error_rate=self.cfg.max_error_rate,
                           ceilings=self.ceilings_for(deployment.topology, named.name, cap))
        level.verdict, level.comparison = gated.verdict, gated.comparison
        if found.rate is None:
            level.verdict = Verdict(FAIL, (f"no rate held {search.attainment:.0%} SLO attainment: {found.stop}",
                                           *level.verdict.problems), level.verdict.notes)
        file.add_level(level)
        return level

    def _mark_saturation(self, deployment: Deployment, workload: Workload, level: LevelResult) -> None:
        """A rate level past the saturation point says so, judged against the highest lower rate
        measured of the same sweep (same deployment, same workload but for the rate)."""
        metrics = level.metrics
        if metrics is None or metrics.offered_rate is None or workload.arrival.kind == "trace":
            return
        key = (deployment.name, dataclasses.replace(workload, name="", arrival=dataclasses.replace(
            workload.arrival, rate=None)))
        sweep = self._sweeps.setdefault(key, {})
        below = max((r for r in sweep if r < metrics.offered_rate), default=None)
        hit, note = saturation(sweep[below] if below is not None else None, metrics)
        for trial in level.trials:
            trial.saturated, trial.saturation_note = hit, note
        sweep[metrics.offered_rate] = metrics

    def _trial(self, live: LiveDeployment, workload: Workload, concurrency: int, samples_base: Path) -> Trial:
        """One measurement of a level, with what the GPUs and the servers' CPUs did meanwhile,
        its requests written beside the record (``records.samples``)."""
        name = live.deployment.name
        pids = live.launcher.pids if live.launcher is not None else {}
        prefix = live.deployment.topology.env.get("VLLM_PROCESS_NAME_PREFIX", DEFAULT_TITLE_PREFIX)
        requests: list = []
        with GpuSampler(live.gpus) as sampler, ServerCpuSampler(pids, title_prefix=prefix) as cpu:
            started = time.time()
            metrics = self._ray_level(live, workload, concurrency) if self.cfg.ray_load_workers else \
                run_level(live.endpoints, live.model, workload, concurrency, samples=requests,
                          api_key=self.cfg.api_key, workers=self.cfg.workers,
                          level_timeout_s=self.cfg.level_timeout_s, precision=self.cfg.precision,
                          max_window_s=self.cfg.max_window_s,
                          progress=lambda done, total, tok_s, failed: self.progress.measuring(
                              name, concurrency, done, total, tok_s, failed))
            ended = time.time()
        # Energy over the whole level, warm-up and tail requests included: they ran on the same GPUs.
        trial = Trial.of(metrics, gpu=sampler.summary(metrics.output_tokens
                                                      + int(metrics.unmeasured.get("output_tokens") or 0)))
        extras = None
        if workload.arrival.kind == "trace" and workload.arrival.trace is not None:
            extras = {i: {"prefix_id": row.prefix_id, "session_id": row.session_id}
                      for i, row in enumerate(load_trace(workload.arrival.trace))}
        written = write_samples(samples_base, requests, {
            "deployment": name, "workload": workload.name, "concurrency": concurrency,
            "trial": int(samples_base.name.rsplit("-t", 1)[-1]), "wall_epoch": metrics.wall_epoch}, extras)
        trial.samples = str(written.relative_to(samples_base.parent.parent))
        if pids:
            start, end = metrics.window_wall or (started, ended)
            shares = cpu.shares(start, end)
            trial.server_cpu = {server: share.to_dict() for server, share in shares.items()}
            trial.front_end_bound, trial.front_end_reason = front_end_bound(shares)
        return trial


def _launch_record(launcher: Any, ray_address: str | None) -> dict[str, Any] | None:
    """What was started (nothing, for an endpoint's plan); on Ray, also which node each server ran on."""
    if not launcher.plan.servers:
        return None
    record = launcher.plan.to_dict()
    placement = getattr(launcher, "placement_record", None)
    if placement is not None:
        record["ray"] = {"address": ray_address, "servers": placement()}
    return record
