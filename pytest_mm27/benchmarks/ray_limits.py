"""The harness's own limits on the Ray path: N simulated replicas on a local cluster of logical nodes.

    python -m pytest_mm27.benchmarks.ray_limits [--replicas 16,64] [--nodes 4] [--per-replica 2]
        [--requests-per-slot 8] [--json PATH]

For each N it builds a local Ray cluster (a head without GPUs and ``--nodes``
nodes with enough logical GPUs for N replicas of TP=2), boots N simulator
replicas through the harness's Ray launcher, and measures:

- boot: seconds from the launcher's start to every replica healthy, split
  into placement (groups reserved, actors up, servers spawned) and the
  health wait;
- scrape fan-out: seconds for one /metrics scrape of all N endpoints from
  the driver (median of 5), as the load generator does before and after
  every level;
- record: bytes of the run record (JSON) after one level, the launch plan
  of N servers and their placement included;
- client cores: the driver's load-generator CPU seconds per wall second
  during one level at ``--per-replica`` x N concurrency (the quick
  workload's request shape, ``--requests-per-slot`` requests per slot), with the output tok/s it offered: cores needed for
  that load, and per 1,000 output tok/s;
- teardown: seconds to stop every server from its node and remove the
  actors and groups, and what was left (must be nothing).

On this box every "node" shares the same cores, so boot and teardown also
measure N simulator processes starting on them; on real nodes those start
in parallel. Memory per replica (its keeper, actor and simulator) is read
from the process table while they run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from ..catalog.paths import catalog_dirs
from ..catalog.topology import Placement, load_catalog
from ..config import Mm27Config
from ..harness import Harness

REPO = Path(__file__).resolve().parents[2]
STORE = 80 * 2**20


def _scrape_s(endpoints: tuple[str, ...], rounds: int = 5) -> float:
    import aiohttp

    from ..loadgen.scrape import scrape_tokens

    async def once() -> float:
        async with aiohttp.ClientSession() as session:
            t0 = time.perf_counter()
            await scrape_tokens(session, list(endpoints))
            return time.perf_counter() - t0

    return statistics.median(asyncio.run(once()) for _ in range(rounds))


def _memory_mb(record: dict[str, Any]) -> float:
    """Resident MiB of the keepers and servers (and the actors above them) of one run, per replica."""
    total, servers = 0, record["launch"]["ray"]["servers"]
    for server in servers:
        try:
            keeper = psutil.Process(server["pid"])
            procs = [keeper, *keeper.children(recursive=True)]
            parent = keeper.parent()
            if parent is not None:
                procs.append(parent)             # the actor's worker process
            total += sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            continue
    return total / 2**20 / max(1, len(servers))


def measure(replicas: int, nodes: int, per_replica: int, per_slot: int, work: Path) -> dict[str, Any]:
    from ray.cluster_utils import Cluster

    gpus_per_node = -(-replicas * 2 // nodes)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "object_store_memory": STORE, "include_dashboard": False})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1, num_gpus=gpus_per_node, object_store_memory=STORE)
        cluster.wait_for_nodes()
        cfg = Mm27Config(topologies=("dp2",), topologies_given=True, engine="sim", workload="quick",
                         results_dir=work / f"r{replicas}", ray_address=cluster.address, startup_timeout_s=600.0)
        harness = Harness(cfg, REPO)
        base = load_catalog(catalog_dirs("topologies")).get("dp3")
        topology = dataclasses.replace(base, name=f"sim{replicas}", data_parallel=replicas, gpus=2 * replicas,
                                       placement=Placement(nodes=nodes))
        deployment = harness.declare(topology)
        t0 = time.monotonic()
        live = harness.boot(deployment)
        boot_s = time.monotonic() - t0
        if live.failure:
            raise SystemExit(f"boot of {replicas} replicas failed: {live.failure}")
        launcher = live.launcher
        scrape_s = _scrape_s(live.endpoints)
        concurrency = per_replica * replicas
        result = deployment.run(concurrency, requests_per_concurrency=per_slot)
        (record_path,) = harness.run_dir.glob(f"{topology.name}--*.json")
        record = json.loads(record_path.read_text())
        memory = _memory_mb(record)
        trial = result.level.trials[0]
        level = record["levels"][0]["trials"][0]
        wall = level.get("duration_s") or level.get("wall_s") or 0.0
        t1 = time.monotonic()
        harness.close()
        teardown_s = time.monotonic() - t1
        record = json.loads(record_path.read_text())
        nodes_used = len({s["node_id"] for s in record["launch"]["ray"]["servers"]})
        cores = level["client_cpu_s"] / wall if wall else None
        out_tok_s = trial.output_tok_s
        return {
            "replicas": replicas, "nodes": nodes_used, "boot_s": round(boot_s, 2),
            "startup_s": record.get("startup_s"), "scrape_s": round(scrape_s, 4),
            "record_bytes": record_path.stat().st_size, "concurrency": concurrency,
            "requests": level.get("requests"), "level_wall_s": round(wall, 2) if wall else None,
            "output_tok_s": round(out_tok_s, 1), "client_cpu_s": round(level["client_cpu_s"], 3),
            "client_cores": round(cores, 3) if cores is not None else None,
            "cores_per_1k_tok_s": round(cores / out_tok_s * 1000, 3) if cores and out_tok_s else None,
            "client_bound": level.get("client_bound"), "memory_mb_per_replica": round(memory, 1),
            "teardown_s": round(teardown_s, 2), "teardown_leftovers": record["teardown"]["leftovers"],
            "teardown_errors": record["teardown"]["errors"], "verdict": result.verdict.status,
            "launcher": type(launcher).__name__,
        }
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.benchmarks.ray_limits", description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", default="16,64", help="comma-separated replica counts (default 16,64)")
    ap.add_argument("--nodes", type=int, default=4, help="logical nodes the replicas spread over (default 4)")
    ap.add_argument("--per-replica", type=int, default=2, help="concurrency per replica in the measured level")
    ap.add_argument("--requests-per-slot", type=int, default=8, help="requests each slot sends in that level")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    # The nodes' workers import this checkout, as the driver does.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mm27-ray-limits-") as tmp:
        for n in (int(x) for x in args.replicas.split(",")):
            row = measure(n, args.nodes, args.per_replica, args.requests_per_slot, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = [("replicas", "replicas"), ("nodes", "nodes"), ("boot_s", "boot s"), ("scrape_s", "scrape s"),
            ("record_bytes", "record B"), ("concurrency", "c"), ("output_tok_s", "out tok/s"),
            ("client_cores", "client cores"), ("cores_per_1k_tok_s", "cores/1k tok/s"),
            ("memory_mb_per_replica", "MiB/replica"), ("teardown_s", "teardown s")]
    print("  ".join(f"{h:>14}" for _, h in cols))
    for row in rows:
        print("  ".join(f"{row[k] if row[k] is not None else '-':>14}" for k, _ in cols))
    for row in rows:
        if row["teardown_leftovers"] or row["verdict"] == "error":
            print(f"replicas={row['replicas']}: verdict {row['verdict']}, leftovers {row['teardown_leftovers']}",
                  file=sys.stderr)
            return 1
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
