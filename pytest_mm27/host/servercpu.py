"""CPU used by each server's processes during a level, and whether its API server was the limit.

vLLM's API server is one Python asyncio process. With a small model it
saturates its one core before the GPU is busy (measured on an H200: 0.99 of a
core at c=64 and c=256, the engine process at 0.49 cores, SM use 18-24%), so a
level that stops scaling there measured the front end, not the GPU. A
background thread samples, for every server, the cumulative CPU seconds of
each process in the tree the launcher started; ``shares()`` turns the samples
into cores used over the load generator's measured window.

Processes are told apart by the titles vLLM gives its children with
setproctitle (a vLLM dependency): ``<prefix>::APIServer_<i>`` (also
``APIServer_DP<r>`` under the multi-port supervisor), ``EngineCore`` /
``EngineCore_DP<r>``, ``Worker`` / ``Worker_TP<i>`` etc. and
``DPCoordinator``, where the prefix is ``$VLLM_PROCESS_NAME_PREFIX`` (default
``VLLM``). With one API server ``vllm serve`` itself serves the API and keeps
its command line; with ``--api-server-count N > 1`` it only supervises.
"""

from __future__ import annotations

import bisect
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

DEFAULT_TITLE_PREFIX = "VLLM"
SAMPLE_INTERVAL_S = 0.25
# Finding new children means reading every process on the host (~30 us each,
# thousands on a big GPU box); CPU times of the known ones are cheap. vLLM
# starts its processes at boot, so a child born during a level is rare, and
# this delay loses at most this much of its CPU time.
RESCAN_S = 1.0
# Fewer samples than this inside a window is too little to interpolate a share
# from: the edges' interpolation would be most of the answer.
MIN_SAMPLES = 3
# A Python asyncio server that saturates its one core shows 0.9-1.0 of it
# (0.98-0.99 measured on an H200; the margin covers the clock ticks CPU time
# is counted in and the interpolated edges); below that its event loop still
# had idle time, so it was not what limited the level.
FRONT_END_CORE_SHARE = 0.9

_API_TITLE = re.compile(r"APIServer(_\S+)?")
_ENGINE_TITLE = re.compile(r"(EngineCore|Worker)(_\S+)?")

API, ENGINE, OTHER = "api", "engine", "other"


@dataclass
class ProcessSeries:
    """One process's cumulative CPU seconds (user + system) at wall-clock times."""

    pid: int
    ppid: int                           # its parent when first seen: an orphan's later parent says nothing
    cmdline: str                        # the latest one read: vLLM retitles workers after start-up
    points: list[tuple[float, float]] = field(default_factory=list)   # (time.time(), cpu_s), time order

    def cpu_at(self, wall: float) -> float:
        """Cumulative CPU seconds at ``wall``, linear between samples; outside the
        seen span, the nearest sample's (a process counts for the part it was seen)."""
        times = [t for t, _ in self.points]
        i = bisect.bisect_left(times, wall)
        if i == 0:
            return self.points[0][1]
        if i == len(times):
            return self.points[-1][1]
        (t0, c0), (t1, c1) = self.points[i - 1], self.points[i]
        return c0 + (c1 - c0) * (wall - t0) / (t1 - t0)


@dataclass(frozen=True)
class ProcessCpu:
    pid: int
    title: str                          # vLLM's title ("EngineCore_DP1"), else the program's name
    cores: float                        # CPU seconds used in the window / window seconds

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "title": self.title, "cores": self.cores}


@dataclass(frozen=True)
class ServerCpu:
    """Cores one server's processes used over one window."""

    window_s: float
    samples: int                        # sampling rounds inside the window
    api: tuple[ProcessCpu, ...]         # the API server process(es)
    engine: tuple[ProcessCpu, ...]      # engine cores and their workers
    other_cores: float                  # supervisor, coordinator, resource trackers, the rest

    @property
    def too_short(self) -> bool:
        """Too few samples inside the window to judge the shares by."""
        return self.samples < MIN_SAMPLES

    @property
    def api_max_cores(self) -> float:
        return max((p.cores for p in self.api), default=0.0)

    @property
    def engine_cores(self) -> float:
        return sum((p.cores for p in self.engine), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s, "samples": self.samples, "too_short": self.too_short,
            "api_max_cores": self.api_max_cores, "engine_cores": self.engine_cores,
            "other_cores": self.other_cores,
            "api": [p.to_dict() for p in self.api], "engine": [p.to_dict() for p in self.engine],
        }


def process_title(cmdline: str, prefix: str = DEFAULT_TITLE_PREFIX) -> str | None:
    """vLLM's name for the process ("EngineCore_DP0") when it has retitled it, else None."""
    match = re.match(rf"{re.escape(prefix)}::(\S+)", cmdline.strip())
    return match.group(1) if match else None


def _program(cmdline: str, pid: int) -> str:
    # The program's name only: a server's arguments may carry its API key.
    words = cmdline.split()
    return os.path.basename(words[0]) if words else f"pid {pid}"


def classify(series: Sequence[ProcessSeries], root_pid: int,
             prefix: str = DEFAULT_TITLE_PREFIX) -> list[str]:
    """The role of each process of one server's tree: API, ENGINE or OTHER.

    Without titles (setproctitle missing) only the root can be told: it is
    taken for the API server, which is right unless --api-server-count > 1;
    then its low share misses a verdict, never makes a false one.
    """
    titles = [process_title(s.cmdline, prefix) for s in series]
    roles = [API if t and _API_TITLE.fullmatch(t) else ENGINE if t and _ENGINE_TITLE.fullmatch(t) else OTHER
             for t in titles]
    if API in roles:
        return roles
    # One API server: it is the untitled process that spawned the engine core,
    # which is the root unless the vLLM command was a wrapper (uv run, a script).
    spawners = {s.ppid for s, t in zip(series, titles) if t and t.startswith("EngineCore")}
    front = [i for i, (s, t) in enumerate(zip(series, titles)) if t is None and s.pid in spawners]
    if not front:
        # No engine core seen: our simulator (one process) or titles missing.
        front = [i for i, (s, t) in enumerate(zip(series, titles)) if t is None and s.pid == root_pid]
    for i in front:
        roles[i] = API
    return roles


def server_cpu(series: Sequence[ProcessSeries], ticks: Sequence[float], root_pid: int,
               start_wall: float, end_wall: float, prefix: str = DEFAULT_TITLE_PREFIX) -> ServerCpu:
    """One server's CPU shares over [start_wall, end_wall]; ``ticks`` are the sampling rounds' times."""
    window = end_wall - start_wall
    seen = [s for s in series if s.points]
    groups: dict[str, list[ProcessCpu]] = {API: [], ENGINE: [], OTHER: []}
    for s, role in zip(seen, classify(seen, root_pid, prefix)):
        used = s.cpu_at(end_wall) - s.cpu_at(start_wall)
        title = process_title(s.cmdline, prefix) or _program(s.cmdline, s.pid)
        groups[role].append(ProcessCpu(s.pid, title, used / window if window > 0 else 0.0))

    def ordered(procs: Iterable[ProcessCpu]) -> tuple[ProcessCpu, ...]:
        return tuple(sorted(procs, key=lambda p: (p.title, p.pid)))

    return ServerCpu(
        window_s=window,
        samples=sum(1 for t in ticks if start_wall <= t <= end_wall),
        api=ordered(groups[API]), engine=ordered(groups[ENGINE]),
        other_cores=sum((p.cores for p in groups[OTHER]), 0.0),
    )


def front_end_bound(cpu: Mapping[str, ServerCpu],
                    threshold: float = FRONT_END_CORE_SHARE) -> tuple[bool, str | None]:
    """Whether any server's busiest API process used ``threshold`` of a core or more, and which."""
    reasons = []
    for name in sorted(cpu):
        share = cpu[name]
        if share.too_short or share.api_max_cores < threshold:
            continue
        busiest = max(share.api, key=lambda p: p.cores)
        which = f" {busiest.title}" if len(share.api) > 1 else ""
        reasons.append(f"{name}: API server{which} at {busiest.cores:.2f} of a core "
                       f"(engine {share.engine_cores:.2f} cores)")
    return (True, "; ".join(reasons)) if reasons else (False, None)


@dataclass
class _Tree:
    root_pid: int
    alive: dict[tuple[int, float], psutil.Process] = field(default_factory=dict)   # (pid, create_time)
    series: dict[tuple[int, float], ProcessSeries] = field(default_factory=dict)
    ticks: list[float] = field(default_factory=list)


class ServerCpuSampler:
    """``with ServerCpuSampler({"dp3-r0": pid}) as s: <load>`` then ``s.shares(start, end)``.

    ``roots`` maps each server's name to the pid the launcher started; its
    whole tree is followed, children that appear later included (within
    RESCAN_S) and vanished ones kept for the part they were seen.
    """

    def __init__(self, roots: Mapping[str, int], interval_s: float = SAMPLE_INTERVAL_S, *,
                 title_prefix: str = DEFAULT_TITLE_PREFIX):
        self.roots = dict(roots)
        self.interval_s = interval_s
        self.title_prefix = title_prefix
        self._trees = {name: _Tree(pid) for name, pid in self.roots.items()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_rescan = float("-inf")

    def __enter__(self) -> ServerCpuSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for tree in self._trees.values():
            try:
                root = psutil.Process(tree.root_pid)
                self._adopt(tree, root, root.ppid())
            except psutil.NoSuchProcess:
                pass                    # already gone: its server gets no samples, hence no verdict
        # A first round now, so a window that opens right after start is bracketed.
        self._tick()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mm27-server-cpu", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        self._tick()                    # and a last one, so the window's end is bracketed too

    def shares(self, start_wall: float, end_wall: float) -> dict[str, ServerCpu]:
        """Per server, the cores its processes used between two time.time() instants."""
        with self._lock:
            return {name: server_cpu(list(tree.series.values()), tree.ticks, tree.root_pid,
                                     start_wall, end_wall, self.title_prefix)
                    for name, tree in self._trees.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._tick()

    def _adopt(self, tree: _Tree, proc: psutil.Process, ppid: int) -> bool:
        """Follow ``proc`` from now on; False when it already is (or was)."""
        key = (proc.pid, proc.create_time())
        if key in tree.series:
            return False
        tree.alive[key] = proc
        with self._lock:
            tree.series[key] = ProcessSeries(proc.pid, ppid, "")
        return True

    def _rescan(self) -> None:
        table: dict[int, psutil.Process] = {}
        children: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["ppid"]):
            if proc.info["ppid"] is not None:
                table[proc.pid] = proc
                children.setdefault(proc.info["ppid"], []).append(proc.pid)
        for tree in self._trees.values():
            for pid, created in list(tree.alive):
                if pid not in table or table[pid].create_time() != created:
                    del tree.alive[pid, created]       # gone, its pid maybe reused
            stack = [pid for pid, _ in tree.alive]
            while stack:
                parent = stack.pop()
                for pid in children.get(parent, ()):
                    if self._adopt(tree, table[pid], parent):
                        stack.append(pid)

    def _tick(self) -> None:
        now = time.time()
        if now - self._last_rescan >= RESCAN_S:
            self._rescan()
            self._last_rescan = now
        for tree in self._trees.values():
            read = [(key, point) for key in list(tree.alive) if (point := self._read(tree, key))]
            with self._lock:
                for key, (wall, cpu_s, cmdline) in read:
                    series = tree.series[key]
                    series.points.append((wall, cpu_s))
                    series.cmdline = cmdline or series.cmdline
                if read:
                    tree.ticks.append(now)

    @staticmethod
    def _read(tree: _Tree, key: tuple[int, float]) -> tuple[float, float, str] | None:
        """(time.time(), CPU seconds, command line) of one process; None when it is gone."""
        proc = tree.alive[key]
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            del tree.alive[key]
            return None
        except psutil.AccessDenied:
            return None
        wall = time.time()
        try:
            # setproctitle pads the old argv area: the title, then empty words
            cmdline = " ".join(word for word in proc.cmdline() if word)
        except psutil.Error:            # exiting as we read: keep the title it had
            cmdline = ""
        return wall, times.user + times.system, cmdline
