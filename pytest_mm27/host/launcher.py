"""Start a launch plan's servers, wait until they serve, and tear them down.

Each server is a child in its own session (so its process group holds it and
everything it spawns), writing stdout+stderr to one log file per server. A
child that exits during start-up fails the boot within about a second, with
its exit code and log tail. Teardown signals whole process families
(SIGTERM, then SIGINT, then SIGKILL; :mod:`.processes`), verifies that
nothing of them is left, and removes the shared-memory files and temp
folders the servers left behind (:mod:`.cleanup`). Launchers still running
when Python exits are stopped by :mod:`.exits`, so a crashed run never
leaves GPU-holding orphans.

No pytest here. For the plugin, :mod:`pytest_mm27.harness` drives it step
by step: ``start()`` and ``wait_healthy()`` when a topology's first level
needs it, ``check_alive()`` around each level, ``stop()`` before the next
topology boots or when the session ends. Scripts write
``with Launcher(plan, log_dir) as launcher:``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plan import LaunchPlan, ServerSpec
from ..errors import LaunchError
from . import cleanup, exits, probe
from .gpus import memory_not_freed
from .ports import pick_port, port_in_use
from .processes import Family, describe, exit_status, exit_text, process_table, wait_gone
from .serverlog import LOG_TAIL_LINES, open_log, read_log_tail

# elapsed seconds, the startup timeout, the last line of a waiting server's log
BootProgress = Callable[[float, float, str], None]

__all__ = ["Launcher", "TeardownReport"]

POLL_INTERVAL_S = 0.2
DEFAULT_GRACE_S = 10.0
KILL_WAIT_S = 5.0
GPU_FREE_WAIT_S = 10.0              # the driver frees memory shortly after the process is gone

ADDR_IN_USE_RE = re.compile(r"address already in use|errno 98\b|EADDRINUSE", re.I)


# --- reports --------------------------------------------------------------

@dataclass
class TeardownReport:
    seconds: float = 0.0
    leftovers: tuple[str, ...] = ()             # processes still alive after SIGKILL
    killed: tuple[str, ...] = ()                # servers that needed SIGKILL
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    removed: tuple[str, ...] = ()               # shm segments / temp dirs cleaned up
    errors: tuple[str, ...] = ()
    gpu_memory_in_use_mb: dict[int, int] = field(default_factory=dict)   # owned GPUs not freed

    @property
    def clean(self) -> bool:
        return not self.leftovers and not self.gpu_memory_in_use_mb

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "leftovers": list(self.leftovers), "killed": list(self.killed),
                "exit_codes": dict(self.exit_codes), "removed": list(self.removed), "errors": list(self.errors),
                "gpu_memory_in_use_mb": {str(k): v for k, v in self.gpu_memory_in_use_mb.items()}}

    def summary(self) -> str:
        text = f"teardown took {self.seconds:.1f} s"
        if self.killed:
            text += f"; SIGKILLed: {', '.join(self.killed)}"
        if self.removed:
            text += f"; removed {len(self.removed)} leftover file(s)"
        if self.leftovers:
            text += f"; STILL RUNNING: {'; '.join(self.leftovers)}"
        if self.gpu_memory_in_use_mb:
            text += "; GPU memory not freed: " + ", ".join(
                f"GPU {i} {mb} MiB" for i, mb in sorted(self.gpu_memory_in_use_mb.items()))
        return text


# --- the launcher ---------------------------------------------------------

@dataclass
class _Server:
    spec: ServerSpec
    picked_port: bool                   # the launcher chose the port: may retry on another
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    healthy: bool = False
    last_probe: str = "not probed yet"
    retried: bool = False
    family: Family | None = None        # its processes, from the spawn on
    tmp_dir: Path | None = None         # the server's own TMPDIR (spec.private_tmp)


class Launcher:
    """Boots a :class:`LaunchPlan`; a context manager (enter = start + wait healthy).

    ``plan`` may change during start (a port the launcher picked is replaced
    after an "address already in use"); read endpoints from :attr:`plan`.
    Servers whose port is 0 in the plan get a free port picked here; other
    ports are pinned and checked for being taken before anything boots.
    """

    def __init__(self, plan: LaunchPlan, log_dir: Path, *, grace_s: float = DEFAULT_GRACE_S):
        self.plan = plan
        self.log_dir = Path(log_dir)
        self.grace_s = grace_s
        self.teardown: TeardownReport | None = None
        self._servers: list[_Server] = []
        self._before: cleanup.Snapshot | None = None     # taken at start: what cleanup leaves alone
        self._started = False
        self._stopping = False

    # -- public ------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.plan.endpoints

    @property
    def log_paths(self) -> dict[str, Path]:
        return {s.spec.name: s.log_path for s in self._servers}

    @property
    def pids(self) -> dict[str, int]:
        return {s.spec.name: s.popen.pid for s in self._servers if s.popen is not None}

    def __enter__(self) -> Launcher:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def launch(self) -> Launcher:
        """start() then wait_healthy(); stops everything if either fails."""
        try:
            self.start()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def start(self) -> None:
        """Spawn every server (does not wait for health)."""
        if self._started:
            raise LaunchError("this launcher was already started; make a new one")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, progress: BootProgress | None = None) -> None:
        """Poll ``/health`` and ``/v1/models`` until every server serves the model.

        Raises :class:`LaunchError` (after stopping all servers) when a child
        exits, when a server answers with a fatal mistake (wrong model, bad
        API key), or when ``plan.startup_timeout_s`` passes. ``progress(elapsed,
        timeout, last log line)`` hears about the wait about once a second.
        """
        if not self._started:
            raise LaunchError("start() the launcher before waiting for it")
        try:
            self._wait_healthy(progress)
        except BaseException:
            self.stop()             # KeyboardInterrupt too: never leave children behind
            raise

    def check_alive(self) -> None:
        """Raise :class:`LaunchError` with the log tail if a server has died."""
        dead = []
        for server in self._servers:
            if server.popen is None or server.family is None:
                continue
            server.family.remember()
            code = exit_status(server.popen)
            if code is not None:
                dead.append(self._death_text(server, code, during="while serving"))
        if dead:
            raise LaunchError("\n\n".join(dead))

    def stop(self) -> TeardownReport:
        """Stop every server and clean up after them; idempotent, re-entrant safe."""
        if self.teardown is not None:
            return self.teardown
        if self._stopping:          # re-entered from a signal handler mid-teardown
            return TeardownReport(errors=("teardown already in progress",))
        self._stopping = True
        t0 = time.monotonic()
        try:
            report = self._stop()
        except BaseException as exc:    # keep going to the bookkeeping; never mask the cause
            report = TeardownReport(errors=(f"teardown failed: {exc!r}",))
            if not isinstance(exc, Exception):
                raise
        finally:
            exits.untrack(self)
            self._stopping = False
        report.seconds = time.monotonic() - t0
        self.teardown = report
        return report

    # -- start ---------------------------------------------------------------

    def _log_path(self, name: str) -> Path:
        """``<server>.log``; a later boot of the same server in this folder gets ``<server>.2.log``,
        so the log of an earlier boot (which may be the one to read) is never overwritten."""
        path, n = self.log_dir / f"{name}.log", 1
        while path.exists():
            n += 1
            path = self.log_dir / f"{name}.{n}.log"
        return path

    def _start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._before = cleanup.snapshot()
        taken: set[int] = set()
        for spec in self.plan.servers:
            if spec.port:
                if spec.port in taken or port_in_use(spec.host, spec.port):
                    raise LaunchError(f"port {spec.port} on {spec.host} is taken (wanted by server {spec.name}); "
                                      f"stop whatever listens there or choose another port")
                taken.add(spec.port)
        for i, spec in enumerate(self.plan.servers):
            picked = spec.port == 0
            if picked:
                spec = spec.with_port(pick_port(spec.host, taken))
                self.plan = self.plan.with_server(i, spec)
            taken.add(spec.port)
            self._servers.append(_Server(spec=spec, picked_port=picked, log_path=self._log_path(spec.name)))
        exits.track(self)
        for server in self._servers:
            self._spawn(server, first=True)

    def _spawn(self, server: _Server, *, first: bool) -> None:
        spec = server.spec
        env = {**os.environ, **spec.env}
        if spec.private_tmp:
            if server.tmp_dir is None:
                # Short, under the system temp folder: vLLM puts IPC sockets in
                # TMPDIR and a socket path may not exceed 107 bytes.
                server.tmp_dir = Path(tempfile.mkdtemp(prefix=f"mm27-{spec.name}-"))
            env["TMPDIR"] = str(server.tmp_dir)
        with open_log(server.log_path, spec, self.plan, server.tmp_dir, retry=not first) as fh:
            try:
                server.popen = subprocess.Popen(
                    list(spec.argv), stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True, close_fds=True,
                )
            except OSError as exc:
                raise LaunchError(f"server {spec.name}: cannot run {spec.argv[0]!r}: {exc.strerror or exc}\n"
                                  f"command: {spec.command_line()}") from None
        server.started_at = time.monotonic()
        server.healthy = False
        server.last_probe = "not probed yet"
        server.family = Family(server.popen.pid)
        server.family.remember()

    # -- health ----------------------------------------------------------------

    def _wait_healthy(self, progress: BootProgress | None = None) -> None:
        timeout = self.plan.startup_timeout_s
        started = time.monotonic()
        deadline = started + timeout
        last_family_scan = 0.0
        while True:
            now = time.monotonic()
            table = None
            if now - last_family_scan >= 1.0:
                last_family_scan = now
                table = process_table()
                waiting = next((s for s in self._servers if not s.healthy), None)
                if progress is not None and waiting is not None:
                    last = read_log_tail(waiting.log_path, 1).strip().splitlines()
                    progress(now - started, timeout, last[-1] if last else "")
            for i, server in enumerate(self._servers):
                self._check_exited(i, server)       # healthy ones too: any death fails the boot
                if table is not None and server.family is not None:
                    server.family.remember(table)
                if not server.healthy:
                    self._probe(server)
            if all(s.healthy for s in self._servers):
                return
            if time.monotonic() >= deadline:
                raise LaunchError(self._timeout_text(timeout))
            time.sleep(POLL_INTERVAL_S)

    def _check_exited(self, index: int, server: _Server) -> None:
        assert server.popen is not None
        code = exit_status(server.popen)
        if code is None:
            return
        tail = read_log_tail(server.log_path, 200)
        if server.picked_port and not server.retried and not server.healthy and ADDR_IN_USE_RE.search(tail):
            # Someone took the port between our pick and the child's bind: try once more.
            server.retried = True
            self._kill_now(server)
            taken = {s.spec.port for s in self._servers}
            spec = server.spec.with_port(pick_port(server.spec.host, taken))
            self.plan = self.plan.with_server(index, spec)
            server.spec = spec
            self._spawn(server, first=False)
            return
        raise LaunchError(self._death_text(server, code, during="during start-up"))

    def _probe(self, server: _Server) -> None:
        spec = server.spec
        if not spec.serves:         # a headless rank: no HTTP; alive is all it can be
            server.healthy, server.last_probe = True, "running (serves no HTTP)"
            return
        health = probe.get(spec.base_url + "/health")
        if health.status != 200:
            server.last_probe = f"GET /health: {health.why}"
            return
        assert server.popen is not None
        if exit_status(server.popen) is not None:
            return                  # exited between the checks; noticed next round
        models = probe.get(spec.base_url + "/v1/models", spec.api_key)
        if models.status in (401, 403):
            raise LaunchError(f"server {spec.name} refused GET /v1/models with HTTP {models.status}: "
                              f"the API key the harness sends does not match the server's")
        if models.status != 200:
            server.last_probe = f"GET /v1/models: {models.why}"
            return
        served = _model_ids(models.body)
        if self.plan.model and served is not None and self.plan.model not in served:
            raise LaunchError(f"server {spec.name} is up but does not serve model {self.plan.model!r} "
                              f"(it serves: {', '.join(served) or 'nothing'}); check served_name")
        server.healthy = True
        server.last_probe = "healthy"

    def _death_text(self, server: _Server, code: int, *, during: str) -> str:
        spec = server.spec
        age = time.monotonic() - server.started_at
        return (f"server {spec.name} exited {during} ({exit_text(code)}, {age:.1f} s after start)\n"
                f"command: {spec.command_line()}\n"
                f"--- last {LOG_TAIL_LINES} lines of {server.log_path} ---\n"
                f"{read_log_tail(server.log_path)}")

    def _timeout_text(self, timeout: float) -> str:
        waiting = [s for s in self._servers if not s.healthy]
        names = ", ".join(f"{s.spec.name} ({s.last_probe})" for s in waiting)
        parts = [f"{len(waiting)} of {len(self._servers)} server(s) not healthy after the {timeout:g} s "
                 f"start-up timeout: {names}"]
        for s in waiting:
            parts.append(f"--- {s.spec.name}: last {LOG_TAIL_LINES} lines of {s.log_path} ---\n"
                         f"{read_log_tail(s.log_path)}")
        parts.append("(raise startup_timeout_s in the topology if the model just needs longer to load)")
        return "\n".join(parts)

    # -- stop ------------------------------------------------------------------

    def _signal_and_wait(self, servers: list[_Server], sig: int, until: float) -> list[_Server]:
        """Send ``sig`` to every process of ``servers``; those with some left at ``until``."""
        families = [s.family for s in servers if s.family is not None]
        if not families:
            return []
        table = process_table()
        for family in families:
            family.remember(table)
            family.signal(sig, table)
        left = wait_gone(families, until)
        return [s for s in servers if s.family in left]

    def _kill_now(self, server: _Server) -> None:
        """SIGKILL a failed attempt's whole family and reap it (before a retry)."""
        assert server.popen is not None
        self._signal_and_wait([server], signal.SIGKILL, time.monotonic() + KILL_WAIT_S)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.popen.wait(timeout=1.0)

    def _stop(self) -> TeardownReport:
        running = [s for s in self._servers if s.popen is not None]
        exit_codes: dict[str, int | None] = {}
        errors: list[str] = []
        start = time.monotonic()
        left = self._signal_and_wait(running, signal.SIGTERM, start + self.grace_s / 2)
        left = self._signal_and_wait(left, signal.SIGINT, start + self.grace_s)
        killed = [s.spec.name for s in left]
        self._signal_and_wait(left, signal.SIGKILL, time.monotonic() + KILL_WAIT_S)
        # Verify (before reaping, while our pids are still reserved): nothing of
        # any group, session or recorded family survives.
        table = process_table() if running else {}
        leftovers = [f"{s.spec.name}: {describe(pid)}" for s in running if s.family for pid in s.family.alive(table)]
        for server in running:
            assert server.popen is not None
            try:
                server.popen.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                errors.append(f"{server.spec.name}: pid {server.popen.pid} did not exit")
            exit_codes[server.spec.name] = server.popen.returncode
        removed, clean_errors = [], []
        if self._before is not None:
            private_tmp = [s.tmp_dir for s in self._servers if s.tmp_dir is not None]
            removed, clean_errors = cleanup.remove_leftovers(self._before, private_tmp)
        gpu_memory = self._gpu_memory_left(running) if running else {}
        if gpu_memory:
            errors.append("GPU memory still in use after teardown: "
                          + ", ".join(f"GPU {i}: {mb} MiB" for i, mb in sorted(gpu_memory.items())))
        return TeardownReport(leftovers=tuple(leftovers), killed=tuple(killed), exit_codes=exit_codes,
                              removed=tuple(removed), errors=tuple(errors + clean_errors),
                              gpu_memory_in_use_mb=gpu_memory)

    def _gpu_memory_left(self, servers: list[_Server]) -> dict[int, int]:
        """GPUs our servers owned that still hold memory a few seconds after stop."""
        if self.plan.engine != "vllm" or self.plan.topology.device != "cuda":
            return {}
        owned = {g for s in servers for g in s.spec.gpus}
        if not owned:
            return {}
        return memory_not_freed(owned, GPU_FREE_WAIT_S)


def _model_ids(body: bytes) -> list[str] | None:
    try:
        data = json.loads(body)
        return [str(m["id"]) for m in data["data"]]
    except (ValueError, KeyError, TypeError):
        return None
