"""How fast the simulator predicts and plans (goals: a 12-level sweep < 1 s, a 64-GPU plan < 10 s).

    python -m pytest_mm27.benchmarks.sim_speed [--repeat 3]

Prints the best of ``--repeat`` wall-clock runs of each case, in-process (no
interpreter start-up): the dp3 topology's 12 levels on the virtual clock, and
``plan`` over 2 x 7 RTX PRO 6000, 2 x 8 and 8 x 8 H200.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

from ..catalog.paths import catalog_dirs
from ..catalog.topology import load_catalog
from ..catalog.workload import load_workloads
from ..sim.cluster import setup_for_topology
from ..sim.plan import plan
from ..sim.virtual import predict_curve


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.benchmarks.sim_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    topo = load_catalog(catalog_dirs("topologies")).get("dp3")
    workloads = load_workloads(catalog_dirs("workloads"))
    default = workloads.get("default")
    setup = setup_for_topology(topo)
    secs, curve = best_of(args.repeat, lambda: predict_curve(setup, topo.concurrency_levels, default))
    print(f"predict dp3, {len(curve)} levels (c=1..896, 'default'):        {secs:6.3f} s")
    cases = [("rtx-pro-6000", "minimax-m2.7-nvfp4", 2, 7), ("h200", "minimax-m2.7-fp8", 2, 8),
             ("h200", "minimax-m2.7-fp8", 8, 8)]
    for hw, model, nodes, gpus in cases:
        secs, cands = best_of(args.repeat, lambda: plan(hw, model, gpus, default, nodes=nodes))
        runnable = [c for c in cands if c.problem is None]
        top = runnable[0] if runnable else None
        best = f"best {top.label} {top.peak.output_tok_s:,.0f} tok/s at c={top.peak.concurrency}" if top else "none fits"
        print(f"plan {model} on {nodes} x {gpus} {hw} ({len(cands)} splits, {len(runnable)} run): "
              f"{secs:6.3f} s  ({best})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
