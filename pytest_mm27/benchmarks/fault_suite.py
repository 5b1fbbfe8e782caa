"""Fault suite: inject each fault once into a real pytest run on the simulator and check
that the run ends in bounded time, names the cause, keeps the finished levels and
leaves nothing running.

    python -m pytest_mm27.benchmarks.fault_suite [--only NAME ...] [--keep DIR]

Each scenario runs ``pytest`` in a subprocess, in a scratch folder of its own
holding a tiny two-replica topology, a small workload and the stock suite;
signals are sent to that pytest process alone (as ``kill -INT PID`` would),
so the servers it started must be stopped by the harness, not by the signal.
The table lists: the fault, seconds until the run ended (from the signal for
interrupt scenarios, else from start), the bound it had to end within, the
levels kept in the run record, processes left whose working folder is the
scratch folder (must be 0), and the verdict with the first unmet expectation.

The tests in ``tests/test_faults.py`` run these same scenarios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..host.processes import processes_under
from ..testing import floors_file, sim_topology

REPO = Path(__file__).resolve().parents[2]

# The quick workload with a short stall timeout, so a hung stream fails in seconds.
WORKLOAD = """\
name = "faults"
description = "quick, with a 2 s stall timeout"
input_tokens = 128
output_tokens = {output_tokens}
requests_per_concurrency = 1
min_requests = 2
request_timeout_s = 60
stall_timeout_s = {stall}
"""

SUITE = '''
def test_throughput(mm27_level):
    mm27_level.measure()
'''


@dataclass
class Outcome:
    returncode: int | None
    seconds: float                  # until the run ended: from the signal, else from start
    output: str
    records: list[dict[str, Any]]
    left: list[str]                 # processes still running under the scratch folder
    run_dirs: list[Path]
    signalled: bool = False

    @property
    def levels(self) -> list[int]:
        return [lv["concurrency"] for r in self.records for lv in r.get("levels", [])
                if lv.get("metrics") is not None]

    @property
    def statuses(self) -> list[str]:
        return [r.get("status") for r in self.records]

    def level(self, c: int) -> dict[str, Any]:
        for r in self.records:
            for lv in r.get("levels", []):
                if lv["concurrency"] == c:
                    return lv
        raise KeyError(c)

    def errors(self) -> str:
        return "\n".join(e["message"] for r in self.records for e in r.get("errors", []))


Check = Callable[[Outcome], list[str]]


@dataclass
class Scenario:
    name: str                       # the fault injected, as shown in the table
    args: Sequence[str] = ()
    levels: str = "[1, 4]"
    dp: int = 2
    bound_s: float = 60.0
    output_tokens: int = 32
    stall_s: float = 2.0
    floors: dict[int, float] = field(default_factory=dict)
    # (moment, signal): "boot" once a server process exists, "level" once the record
    # holds one finished level (the next one is then running).
    interrupt: tuple[str, int] | None = None
    # Called with (workdir, process) while the run goes, for faults injected from outside.
    during: Callable[[Path, subprocess.Popen[bytes]], None] | None = None
    check: Check = lambda o: []
    runs: int = 1                   # >1: that many identical runs started at once
    setup: Callable[[Path], None] | None = None     # extra files in the scratch folder


# --- helpers -----------------------------------------------------------------------------------

def read_records(workdir: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(workdir.glob("results/runs/*/*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    return out


def server_pids(workdir: Path) -> dict[str, int]:
    """Simulator server processes of the run in ``workdir``, by their --port."""
    out = {}
    for line in processes_under(workdir):
        pid, _, cmd = line.partition(": ")
        if "pytest_mm27.sim serve" in cmd:
            parts = cmd.split()
            out[parts[parts.index("--port") + 1]] = int(pid)
    return out


def wait_for(what: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(step)
    return None


def prepare(workdir: Path, sc: Scenario) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "test_throughput.py").write_text(SUITE)
    for sub in ("topologies", "workloads", "floors"):
        (workdir / sub).mkdir(exist_ok=True)
    (workdir / "topologies" / "tiny.toml").write_text(sim_topology("tiny", sc.levels, sc.dp))
    (workdir / "workloads" / "faults.toml").write_text(
        WORKLOAD.format(output_tokens=sc.output_tokens, stall=sc.stall_s))
    (workdir / "floors" / "rtx-pro-6000.toml").write_text(
        floors_file("tiny", "faults", sc.floors, note="fault-suite floor"))
    if sc.setup is not None:
        sc.setup(workdir)


def pytest_argv(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
            "--topology-dir", "topologies", "--workload-dir", "workloads", "--floors-dir", "floors",
            "--workload", "faults", "--engine", "sim", "--results-dir", "results", "--topology", "tiny", *args]


def run_scenario(sc: Scenario, workdir: Path, env: dict[str, str] | None = None) -> Outcome:
    prepare(workdir, sc)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           **(env or {})}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    logs = [workdir / f"pytest-{i}.out" for i in range(sc.runs)]
    procs = []
    start = time.monotonic()
    for log in logs:
        with log.open("wb") as fh:
            procs.append(subprocess.Popen(pytest_argv(sc.args), cwd=workdir, stdout=fh, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env))
    proc = procs[0]
    signalled = False
    try:
        if sc.interrupt is not None:
            moment, sig = sc.interrupt
            if moment == "boot":
                ready = wait_for(lambda: server_pids(workdir), sc.bound_s)
            else:
                ready = wait_for(lambda: any(r.get("levels") for r in read_records(workdir)), sc.bound_s)
            if ready and proc.poll() is None:
                time.sleep(0.3)         # well inside the boot / the next level
                proc.send_signal(sig)
                signalled = True
                start = time.monotonic()
        if sc.during is not None:
            sc.during(workdir, proc)
        deadline = start + sc.bound_s * 2        # the bound is checked below; this only stops a hang
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        seconds = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:        # ran past twice its bound: stop it, then report the hang
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    left = processes_under(workdir)
    if left:                            # give exiting children a moment, as the tests do
        left = wait_for(lambda: not processes_under(workdir), 5.0) and [] or processes_under(workdir)
    output = "\n".join(log.read_text(errors="replace") for log in logs)
    return Outcome(proc.returncode if sc.runs == 1 else max(p.returncode or 0 for p in procs), seconds, output,
                   read_records(workdir), left, sorted((workdir / "results" / "runs").glob("*")), signalled)


def verdict(sc: Scenario, o: Outcome) -> list[str]:
    """Every unmet expectation: the scenario's own, plus bounded time and nothing left."""
    problems = []
    if o.seconds > sc.bound_s:
        problems.append(f"took {o.seconds:.1f} s, bound {sc.bound_s:g} s")
    if o.left:
        problems.append(f"left running: {o.left}")
    if sc.interrupt is not None and not o.signalled:
        problems.append("the moment to send the signal never came")
    problems += sc.check(o)
    return problems


# --- the scenarios -------------------------------------------------------------------------------

def _expect(cond: bool, text: str) -> list[str]:
    return [] if cond else [text]


def _in_output(o: Outcome, *needles: str) -> list[str]:
    return [f"output lacks {n!r}" for n in needles if n not in o.output]


def kill_replica_mid_level(workdir: Path, proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL replica r1's process group once it is serving a request of the first level."""
    def launch() -> dict[str, Any] | None:
        for r in read_records(workdir):
            if r.get("launch"):
                return r["launch"]
        return None

    plan = wait_for(launch, 60)
    if not plan:
        return
    r1 = next(s for s in plan["servers"] if s["name"].endswith("r1"))

    def busy() -> bool:
        try:
            with urllib.request.urlopen(r1["base_url"] + "/metrics", timeout=1) as resp:
                text = resp.read().decode()
        except OSError:
            return False
        return any(line.startswith("vllm:num_requests_running") and not line.endswith(" 0.0")
                   for line in text.splitlines())

    if wait_for(busy, 60, step=0.02):
        pid = server_pids(workdir).get(str(r1["port"]))
        if pid:
            os.killpg(pid, signal.SIGKILL)


def _check_never_healthy(o: Outcome) -> list[str]:
    return (_expect(o.returncode == 1, f"exit code {o.returncode}, wanted 1")
            + _in_output(o, "not healthy after the 3 s start-up timeout", "GET /health: HTTP 503")
            + _expect(o.statuses == ["failed"], f"record status {o.statuses}"))


def _check_startup_crash(o: Outcome) -> list[str]:
    return (_in_output(o, "exited during start-up (exit code 3", "--startup-crash 0.5: exiting during start-up")
            + _expect(o.statuses == ["failed"], f"record status {o.statuses}")
            + _expect("--startup-crash" in o.errors(), "record errors lack the log tail"))


def _check_level2_failed(reason: str) -> Check:
    def check(o: Outcome) -> list[str]:
        problems = _expect(o.levels == [1, 4], f"levels kept {o.levels}, wanted [1, 4]")
        if problems:
            return problems
        first, second = o.level(1)["metrics"], o.level(4)["metrics"]
        problems += _expect(first["failed"] == 0 and o.level(1)["verdict"]["status"] == "pass",
                            f"level 1 should pass: {o.level(1)['verdict']}")
        problems += _expect(second["failed"] > 0 and reason in json.dumps(second["errors"]),
                            f"level 4 errors {second['errors']} lack {reason!r}")
        ok_tokens = second["ok"] * 32
        problems += _expect(second["output_tokens"] == ok_tokens,
                            f"failed requests folded into output tokens: {second['output_tokens']} != {ok_tokens}")
        problems += _in_output(o, reason)
        problems += _expect(o.level(4)["verdict"]["status"] == "FAIL", "level 4 verdict is not FAIL")
        return problems
    return check


def _check_error_rate(o: Outcome) -> list[str]:
    if o.levels != [8]:
        return [f"levels kept {o.levels}"]
    m = o.level(8)["metrics"]
    return (_expect(0 < m["failed"] < m["requests"], f"failed {m['failed']} of {m['requests']}")
            + _expect(o.level(8)["verdict"]["status"] == "FAIL", "error rate past the limit did not fail the level")
            + _in_output(o, "limit 10.0%", "HTTP 500"))


def _check_replica_killed(o: Outcome) -> list[str]:
    problems = _expect(o.levels[:1] == [2], f"levels kept {o.levels}")
    if problems:
        return problems
    m = o.level(2)["metrics"]
    problems += _expect(m["ok"] >= 1 and m["failed"] >= 1, f"level 2: ok {m['ok']}, failed {m['failed']} "
                                                              "(the other replica should keep serving)")
    problems += _in_output(o, "server tiny-r1 exited while serving (killed by SIGKILL", "requests failed")
    # The next level is not measured on a broken topology; its test names the dead replica.
    problems += _expect(o.output.count("could not measure: tiny c=2: server tiny-r1 exited") >= 1,
                        "the next level does not name the dead replica")
    return problems


def _check_interrupted(levels: list[int]) -> Check:
    def check(o: Outcome) -> list[str]:
        return (_expect(o.returncode == 2, f"exit code {o.returncode}, wanted 2 (interrupted)")
                + _expect(o.statuses == ["interrupted"], f"record status {o.statuses}, wanted interrupted")
                + _expect(o.levels == levels, f"levels kept {o.levels}, wanted {levels}"))
    return check


def _check_midsweep_failure(o: Outcome) -> list[str]:
    return (_expect(o.returncode == 1, f"exit code {o.returncode}")
            + _expect(o.levels == [1, 4, 8], f"levels kept {o.levels}, wanted all three")
            + _expect(o.statuses == ["complete"], f"record status {o.statuses}")
            + _expect("1 failed, 2 passed" in o.output, "outcome line is not '1 failed, 2 passed'"))


def _check_results_dir(o: Outcome) -> list[str]:
    return (_expect(o.returncode == 4, f"exit code {o.returncode}, wanted 4 (usage error)")
            + _in_output(o, "cannot write to the results folder", "not-a-dir/results")
            + _expect(not o.records, "a record was written somewhere"))


def lose_run_folder_after_first_level(workdir: Path, proc: subprocess.Popen[bytes]) -> None:
    """Once level 1 is recorded, replace the run folder by a file: every later write fails."""
    def recorded() -> list[Path]:
        return [p for p in workdir.glob("results/runs/*/tiny.json") if '"concurrency": 1' in p.read_text()]

    found = wait_for(recorded, 60)
    if found:
        run_dir = found[0].parent
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.write_text("not a folder any more\n")


def _check_disk_error(o: Outcome) -> list[str]:
    return (_expect(o.returncode == 1, f"exit code {o.returncode}, wanted 1")
            + _in_output(o, "cannot write run record", "/results/runs/")
            + _expect("Traceback" not in o.output and "INTERNALERROR" not in o.output,
                      "a traceback instead of a message"))


def _check_two_runs(o: Outcome) -> list[str]:
    return (_expect(o.returncode == 0, f"a run failed (exit {o.returncode})")
            + _expect(len(o.run_dirs) == 2, f"{len(o.run_dirs)} run folders, wanted 2")
            + _expect(o.statuses == ["complete", "complete"], f"statuses {o.statuses}"))


def scenarios() -> list[Scenario]:
    return [
        Scenario("never healthy (startup timeout 3 s)", ["--sim-fault", "startup-delay=600", "--startup-timeout", "3"],
                 bound_s=60, check=_check_never_healthy),
        Scenario("exits during start-up", ["--sim-fault", "startup-crash=0.5"], bound_s=60,
                 check=_check_startup_crash),
        Scenario("hangs mid-stream (stall 2 s)", ["--sim-fault", "hang-after=2"], bound_s=60,
                 check=_check_level2_failed("stalled: no data for 2 s")),
        Scenario("HTTP 500 on half the requests", ["--sim-fault", "error-rate=0.5", "--max-error-rate", "0.1"],
                 levels="[8]", bound_s=60, check=_check_error_rate),
        Scenario("malformed SSE on every stream", ["--sim-fault", "malformed-sse-rate=1"], bound_s=60, check=lambda o: _in_output(o, "malformed SSE") + _expect(
                     o.levels == [1, 4] and o.level(4)["metrics"]["failed"] == 4, f"levels {o.levels}")),
        Scenario("stream cut short", ["--sim-fault", "cut-stream-rate=1"], bound_s=60,
                 check=lambda o: _in_output(o, "stream ended before [DONE]") + _expect(
                     o.levels == [1, 4] and o.level(4)["metrics"]["ok"] == 0, f"levels {o.levels}")),
        Scenario("one DP replica killed mid-level", levels="[2, 4]", output_tokens=300, stall_s=10, bound_s=90,
                 during=kill_replica_mid_level, check=_check_replica_killed),
        Scenario("SIGINT during boot", ["--sim-fault", "startup-delay=60"], bound_s=30,
                 interrupt=("boot", signal.SIGINT), check=_check_interrupted([])),
        Scenario("SIGTERM during boot", ["--sim-fault", "startup-delay=60"], bound_s=30,
                 interrupt=("boot", signal.SIGTERM), check=_check_interrupted([])),
        Scenario("SIGINT during a level (hung)", ["--sim-fault", "hang-after=2"], stall_s=60, bound_s=30,
                 interrupt=("level", signal.SIGINT), check=_check_interrupted([1])),
        Scenario("SIGTERM during a level (hung)", ["--sim-fault", "hang-after=2"], stall_s=60, bound_s=30,
                 interrupt=("level", signal.SIGTERM), check=_check_interrupted([1])),
        Scenario("test failure mid-sweep (floor at c=4)", levels="[1, 4, 8]", floors={4: 1e9}, bound_s=60,
                 check=_check_midsweep_failure),
        Scenario("results dir under a file", ["--results-dir", "not-a-dir/results"], bound_s=30,
                 setup=lambda d: (d / "not-a-dir").write_text("a file, not a folder\n"), check=_check_results_dir),
        Scenario("run folder lost mid-run (disk error)", levels="[1, 4, 8]", bound_s=60,
                 during=lose_run_folder_after_first_level, check=_check_disk_error),
        Scenario("two runs at once", levels="[1]", runs=2, bound_s=90, check=_check_two_runs),
    ]


def by_name(name: str) -> Scenario:
    for sc in scenarios():
        if sc.name == name or sc.name.startswith(name):
            return sc
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.benchmarks.fault_suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=None, help="run the scenarios whose name starts so")
    ap.add_argument("--keep", type=Path, default=None, help="keep the scratch folders under DIR")
    args = ap.parse_args(argv)
    chosen = [by_name(n) for n in args.only] if args.only else scenarios()
    base = args.keep or Path(tempfile.mkdtemp(prefix="mm27-faults-"))
    rows = []
    header = f"{'fault injected':<40} {'ended s':>7} {'bound s':>7} {'levels kept':>11} {'left':>4}  verdict"
    print(header)
    print("-" * len(header))
    failed = 0
    for i, sc in enumerate(chosen):
        outcome = run_scenario(sc, base / f"{i:02d}")
        problems = verdict(sc, outcome)
        failed += bool(problems)
        kept = ",".join(map(str, outcome.levels)) or "-"
        line = (f"{sc.name:<40} {outcome.seconds:>7.1f} {sc.bound_s:>7.0f} {kept:>11} {len(outcome.left):>4}  "
                f"{'ok' if not problems else 'FAIL: ' + problems[0][:200]}")
        rows.append(line)
        print(line, flush=True)
    print(f"\n{len(chosen) - failed} of {len(chosen)} scenarios ok; scratch folders: {base}")
    if args.keep is None and not failed:
        import shutil
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
