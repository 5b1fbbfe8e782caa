"""Check the gate's noise model against the simulator served on the wall clock.

    python -m pytest_mm27.benchmarks.sim_noise [--trials 4] [--levels 4,16] [--slowdown 1.1]

Boots ``python -m pytest_mm27.sim serve`` (one server, the hardware and
model of ``--topology``) twice: once as it is and once with ``--slowdown``,
runs ``--trials`` trials of each level with the real load generator, and
prints (1) the trial-to-trial noise actually measured, to set against the
3 % the gate-accuracy benchmark assumes, and (2) what ``compare_records``
decides for unchanged-vs-unchanged (two baseline halves) and
baseline-vs-slowed. The virtual-clock ``predict`` mode is deterministic (no
noise at all), so only the served mode says anything about noise; its noise
is this machine's scheduling jitter, not a GPU's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..gate.compare import compare_records
from ..host.ports import free_port
from ..records.model import REGRESSED
from ..report.terminal import comparison_lines
from ..loadgen import run_level
from ..catalog.paths import catalog_dirs
from ..catalog.topology import load_catalog
from ..catalog.workload import load_workloads
from .synthetic import make_record


def _serve(topology: Any, slowdown: float, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port("127.0.0.1")
    argv = [sys.executable, "-m", "pytest_mm27.sim", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "sim", "--hardware", topology.hardware, "--model", topology.model.spec,
            "--tensor-parallel-size", str(topology.tensor_parallel), "--slowdown", str(slowdown)]
    fh = log.open("w")
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"simulator exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("simulator did not become healthy in 60 s")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass


def measure(topology: Any, workload: Any, levels: Sequence[int], trials: int, slowdown: float,
            log: Path) -> dict[int, list[dict[str, Any]]]:
    proc, url = _serve(topology, slowdown, log)
    out: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
    try:
        for _ in range(trials):          # interleave levels so slow drift spreads over all of them
            for c in levels:
                out[c].append(run_level([url], "sim", workload, c, workers=1).to_dict())
    finally:
        _stop(proc)
    return out


def as_record(template: dict[str, Any], trials: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    rec = json.loads(json.dumps(template))
    rec["levels"] = [{"concurrency": c, "floor": None, "floor_note": None, "metrics": ts[0], "trials": ts,
                      "verdict": {"status": "pass", "problems": [], "notes": []}} for c, ts in trials.items()]
    return rec


def cv_of(values: Sequence[float]) -> float:
    logs = [math.log(v) for v in values]
    m = sum(logs) / len(logs)
    return math.sqrt(sum((x - m) ** 2 for x in logs) / (len(logs) - 1))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.benchmarks.sim_noise", description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="dp3")
    ap.add_argument("--workload", default="quick")
    ap.add_argument("--levels", default="4,16")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--slowdown", type=float, default=1.1)
    args = ap.parse_args(argv)
    topo = load_catalog(catalog_dirs("topologies")).get(args.topology)
    workload = load_workloads(catalog_dirs("workloads")).get(args.workload)
    levels = [int(x) for x in args.levels.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="mm27-sim-noise-"))
    started = time.monotonic()
    base = measure(topo, workload, levels, 2 * args.trials, 1.0, logs / "base.log")
    slow = measure(topo, workload, levels, args.trials, args.slowdown, logs / "slow.log")
    template = make_record(trials=1, levels=levels, topology=topo.name, workload=workload.name,
                           profile=topo.hardware, simulated=True, engine="sim", engine_version=None)
    print(f"simulator served on the wall clock: topology {topo.name} (one server, TP={topo.tensor_parallel}), "
          f"workload {workload.name}, levels {levels}, {args.trials} trials per side "
          f"({time.monotonic() - started:.0f} s)")
    print(f"{'c':>4s} {'tok/s (mean)':>12s} {'trial noise tok/s':>18s} {'ttft p99':>9s} {'tpot p50':>9s} "
          f"{'client-bound':>12s} {'slowed tok/s':>12s}")
    for c in levels:
        ts, ss = base[c], slow[c]
        tok = [t["output_tok_s"] for t in ts]
        print(f"{c:>4d} {sum(tok) / len(tok):>12,.1f} {cv_of(tok):>18.2%} "
              f"{cv_of([t['ttft_ms']['p99'] for t in ts]):>9.2%} {cv_of([t['tpot_ms']['p50'] for t in ts]):>9.2%} "
              f"{sum(bool(t['client_bound']) for t in ts + ss):>12d} "
              f"{sum(t['output_tok_s'] for t in ss) / len(ss):>12,.1f}")
    half_a = as_record(template, {c: base[c][0::2] for c in levels})
    half_b = as_record(template, {c: base[c][1::2] for c in levels})
    slowed = as_record(template, slow)
    for label, a, b in (("unchanged (two halves of the unslowed trials)", half_a, half_b),
                        (f"--slowdown {args.slowdown}", half_a, slowed)):
        result = compare_records(a, b)
        print(f"\n{label}: {result.status}; throughput regressed at "
              f"{[lv.concurrency for lv in result.levels if (m := lv.get('throughput')) and m.status == REGRESSED]}")
        for line in comparison_lines(result)[1:]:
            print(line)
    print(f"\nserver logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
