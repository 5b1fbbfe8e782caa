"""The Ray path end to end, on a local cluster of logical nodes running the simulator.

Marked ``ray``: select with ``-m ray``, leave out with ``-m 'not ray'``. Without
Ray these tests skip, unless ``MM27_REQUIRE_RAY=1`` (CI), where that fails.
One cluster (a head without GPUs, three nodes of two logical GPUs) serves the
module; the node-loss test brings nodes of its own, so no test depends on
another's order. Object stores are kept small: the box is shared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pytest_mm27.catalog.topology import Placement
from pytest_mm27.config import Mm27Config
from pytest_mm27.harness import Harness
from pytest_mm27.records.model import ERROR

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

REPO = Path(__file__).resolve().parents[1]
STORE = 80 * 2**20          # Ray's minimum object store is 75 MiB


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    try:
        from ray.cluster_utils import Cluster
    except ImportError as exc:
        why = f"Ray is not installed ({exc}); pip install 'pytest-mm27[ray]'"
        if os.environ.get("MM27_REQUIRE_RAY") == "1":
            pytest.fail(f"MM27_REQUIRE_RAY=1 but {why}", pytrace=False)
        pytest.skip(why)
    from pytest_mm27.cluster import connect

    # The nodes' workers import this checkout, as the harness's driver does.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved) if p)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "object_store_memory": STORE, "include_dashboard": False})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1, num_gpus=2, object_store_memory=STORE)
        cluster.wait_for_nodes()
        connect.connect(cluster.address)        # held for the module: the checks below ask the cluster too
        yield cluster
    finally:
        connect.disconnect()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def harness_for(cluster: Any, tmp_path: Path, **cfg: Any) -> Harness:
    settings: dict[str, Any] = {"topologies": ("dp3",), "topologies_given": True, "engine": "sim",
                                "workload": "quick", "results_dir": tmp_path / "results",
                                "ray_address": cluster.address, "startup_timeout_s": 90.0}
    return Harness(Mm27Config(**{**settings, **cfg}), REPO)


def server_processes(harness: Harness) -> list[psutil.Process]:
    """The keepers and servers the run started on the (local) nodes, from the pids its record names."""
    launcher = harness._live.launcher if harness._live else None
    assert launcher is not None
    procs = []
    for server in launcher.placement_record():
        keeper = psutil.Process(server["pid"])
        procs += [keeper, *keeper.children(recursive=True)]
    return procs


def still_running(procs: list[psutil.Process], timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in procs
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def ours_on_cluster(run_id: str) -> tuple[set[str], list[str]]:
    """Live named actors and placement groups (not removed) of this run."""
    import ray
    from ray.util.placement_group import placement_group_table

    from pytest_mm27.cluster.launcher import live_actor_names

    actors = {name for name in live_actor_names(ray) if run_id in name}
    groups = [g["name"] for g in placement_group_table().values()
              if run_id in g.get("name", "") and g.get("state") != "REMOVED"]
    return actors, groups


def record_of(harness: Harness, name: str = "dp3") -> dict[str, Any]:
    return json.loads((harness.run_dir / f"{name}.json").read_text())


def test_dp3_replicas_one_per_node_swept_and_torn_down(ray_cluster: Any, tmp_path: Path):
    harness = harness_for(ray_cluster, tmp_path)
    deployment = harness.deployments["dp3"]
    try:
        results = [deployment.run(c) for c in (1, 3)]
        procs = server_processes(harness)
        assert len(procs) >= 6, "a keeper and a simulator per replica"
    finally:
        harness.close()
    for result in results:
        assert result.verdict.status != ERROR, result.verdict.message
        assert result.level.trials[0].ok >= result.concurrency
    record = record_of(harness)
    placed = record["launch"]["ray"]["servers"]
    assert record["launch"]["ray"]["address"] == ray_cluster.address
    assert [s["server"] for s in placed] == ["dp3-r0", "dp3-r1", "dp3-r2"]
    assert len({s["node_id"] for s in placed}) == 3, f"replicas not one per node: {placed}"
    assert all(len(s["devices"]) == 2 for s in placed), "each replica holds its TP=2 GPUs from Ray"
    # Endpoints are node address:port, the servers bind the node's address.
    assert record["launch"]["endpoints"] == [s["base_url"] for s in record["launch"]["servers"]]
    assert all(s["host"] == p["address"] for s, p in zip(record["launch"]["servers"], placed))
    assert [lvl["concurrency"] for lvl in record["levels"]] == [1, 3]
    assert record["teardown"]["leftovers"] == [] and record["teardown"]["errors"] == []
    # The logs came back into the run folder, the simulator's own lines included.
    for name in ("dp3-r0", "dp3-r1", "dp3-r2"):
        log = (harness.run_dir / "logs" / f"{name}.log").read_text()
        assert "# mm27: ray node" in log and "sim: serving on http://" in log
    assert not still_running(procs)
    assert ours_on_cluster(harness.run_id) == (set(), [])


def test_unsatisfiable_placement_refused_before_boot(ray_cluster: Any, tmp_path: Path):
    harness = harness_for(ray_cluster, tmp_path, topologies=("dp2",))
    wide = dataclasses.replace(harness.catalog.get("dp3"), name="dp3-tp4", tensor_parallel=4, gpus=12)
    deployment = harness.declare(wide)
    try:
        result = deployment.run(1)
    finally:
        harness.close()
    assert result.verdict.status == ERROR
    text = result.verdict.message
    assert "placement of topology 'dp3-tp4' cannot be satisfied" in text
    assert "3 server(s) of 4 GPU each, each on one node" in text
    assert text.count(" of 2, CPU 1") == 3 and "no GPU" in text, text
    assert "Nothing was started" in text
    assert ours_on_cluster(harness.run_id) == (set(), [])
    assert not list(harness.run_dir.glob("logs/*.log")), "no server was started, so none wrote a log"


class KillNodeMidLevel:
    """A progress listener that removes the node of replica 1 once the level's first requests are done."""

    def __init__(self, cluster: Any, harness: Harness, nodes: list[Any], concurrency: int):
        self.cluster, self.harness, self.nodes, self.concurrency = cluster, harness, nodes, concurrency
        self.killed: str | None = None
        self.done_at_kill = 0

    def booting(self, *args: Any) -> None:
        pass

    def done(self) -> None:
        pass

    def measuring(self, name: str, concurrency: int, done: int, total: int | None, tok_s: float,
                  failed: int) -> None:
        if self.killed or concurrency != self.concurrency or done < 1:
            return
        launcher = self.harness._live.launcher
        node_id = launcher.placement_record()[1]["node_id"]
        victim = next(n for n in self.nodes if n.node_id == node_id)
        self.cluster.remove_node(victim, allow_graceful=False)     # raylet and workers SIGKILLed
        self.killed, self.done_at_kill = node_id, done


def test_node_lost_mid_level_is_named_keeps_levels_and_leaves_nothing(ray_cluster: Any, tmp_path: Path):
    nodes = [ray_cluster.add_node(num_cpus=1, num_gpus=0, resources={"lostgpu": 2}, object_store_memory=STORE)
             for _ in range(3)]
    ray_cluster.wait_for_nodes()
    harness = harness_for(ray_cluster, tmp_path, topologies=("dp2",))
    topology = dataclasses.replace(harness.catalog.get("dp3"), name="dp3-lost",
                                   placement=Placement(resource="lostgpu"))
    deployment = harness.declare(topology)
    killer = KillNodeMidLevel(ray_cluster, harness, nodes, concurrency=3)
    harness.progress = killer
    try:
        # Levels long enough for the listener to hear of them (about once a second); one variant, one record.
        first = deployment.run(1, requests_per_concurrency=12)
        procs = server_processes(harness)
        lost = deployment.run(3, requests_per_concurrency=12)
        after = deployment.run(4, requests_per_concurrency=12)
    finally:
        harness.close()
        for n in nodes:
            if n.node_id != killer.killed:
                ray_cluster.remove_node(n)
    assert killer.killed, "the level ended before the node could be removed"
    assert first.verdict.status != ERROR, first.verdict.message
    assert lost.verdict.status == ERROR
    assert "was lost (its raylet is gone) with server(s) dp3-lost-r1" in lost.verdict.message
    assert f"node {killer.killed[:8]}" in lost.verdict.message
    assert after.verdict.status == ERROR and "was lost" in after.verdict.message
    (path,) = harness.run_dir.glob("dp3-lost--*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "failed"
    assert [lvl["concurrency"] for lvl in record["levels"]] == [1, 3, 4]
    assert record["levels"][0]["verdict"]["status"] != ERROR, "the level measured before the loss is kept"
    assert any("was lost" in e["message"] for e in record["errors"])
    assert any("unreachable at teardown" in e for e in record["teardown"]["errors"])
    # The lost node's keeper stopped its server; the live nodes' servers were stopped by teardown.
    assert not still_running(procs)
    assert ours_on_cluster(harness.run_id) == (set(), [])


def test_native_dp_over_two_nodes_head_and_headless(ray_cluster: Any, tmp_path: Path):
    harness = harness_for(ray_cluster, tmp_path, topologies=("dp2",))
    topology = dataclasses.replace(harness.catalog.get("dp2"), name="dp2-nodes", placement=Placement(nodes=2))
    deployment = harness.declare(topology)
    try:
        result = deployment.run(2)
        procs = server_processes(harness)
    finally:
        harness.close()
    assert result.verdict.status != ERROR, result.verdict.message
    record = record_of(harness, "dp2-nodes")
    head, rank = record["launch"]["servers"]
    placed = record["launch"]["ray"]["servers"]
    assert len({s["node_id"] for s in placed}) == 2, placed
    assert record["launch"]["endpoints"] == [head["base_url"]] and (head["serves"], rank["serves"]) == (True, False)
    # Every rank dials the head's node address and the RPC port picked there.
    address = placed[0]["address"]
    for spec in (head, rank):
        argv = spec["argv"]
        assert argv[argv.index("--data-parallel-address") + 1] == address
        assert argv[argv.index("--data-parallel-rpc-port") + 1].isdigit()
    log = (harness.run_dir / "logs" / "dp2-nodes-rank1.log").read_text()
    assert "sim: headless, DP ranks 1..1 of 2" in log
    assert not still_running(procs)
    assert ours_on_cluster(harness.run_id) == (set(), [])


def test_plugin_ini_twin_runs_the_suite_on_the_cluster(ray_cluster: Any, pytester: pytest.Pytester):
    from pytest_mm27.testing import sim_topology

    pytester.makepyfile(test_throughput=(REPO / "suites" / "test_throughput.py").read_text())
    (pytester.path / "topologies").mkdir()
    (pytester.path / "topologies" / "tiny.toml").write_text(
        sim_topology("tiny", "[1, 2]", 2, "replicas") + "\n[placement]\nnodes = 2\ngpus_per_node = 2\n")
    pytester.makeini(textwrap.dedent(f"""
        [pytest]
        mm27_ray_address = {ray_cluster.address}
        mm27_topology = tiny
        mm27_workload = quick
        mm27_engine = sim
        mm27_topology_dir = topologies
        mm27_results_dir = out
    """))
    result = pytester.runpytest_subprocess("-v", "-p", "no:randomly", timeout=240)
    result.assert_outcomes(passed=2)
    (path,) = pytester.path.glob("out/runs/*/tiny.json")
    record = json.loads(path.read_text())
    placed = record["launch"]["ray"]["servers"]
    assert record["launch"]["ray"]["address"] == ray_cluster.address
    assert len({s["node_id"] for s in placed}) == 2
    assert record["topology"]["placement"]["nodes"] == 2
    assert ours_on_cluster(record["run_id"]) == (set(), [])


def test_load_workers_as_actors_on_two_nodes_merge_exactly(ray_cluster: Any, tmp_path: Path):
    import ray

    from pytest_mm27.loadgen.ray_workers import LoadWorkerActor, measure_clocks

    harness = harness_for(ray_cluster, tmp_path, ray_load_workers=2)
    try:
        result = harness.deployments["dp3"].run(5, requests_per_concurrency=3)
    finally:
        harness.close()
    assert result.verdict.status != ERROR, result.verdict.message
    trial = result.level.trials[0]
    assert trial.ok == 15 and trial.failed == 0
    (path,) = harness.run_dir.glob("dp3--*.json")
    record = json.loads(path.read_text())
    metrics = record["levels"][0]["trials"][0]
    assert metrics["workers"] == 2 and len(metrics["worker_cpu_util"]) == 2, "the client-bound check is per worker"
    # Every request counted once: exactly the level's share sent, and the servers' own token count agrees.
    assert metrics["requests"] == 15 and metrics["server_tokens_match"] is True, metrics
    # The clock comparison on one host reads (near) zero offset, to within its stated error.
    actors = [ray.remote(LoadWorkerActor).options(num_cpus=0).remote() for _ in range(2)]
    try:
        for clock in measure_clocks(ray, actors):
            assert abs(clock.offset_s) <= clock.error_s + 0.005, clock
    finally:
        for actor in actors:
            ray.kill(actor)
    assert ours_on_cluster(harness.run_id) == (set(), [])


def test_load_workers_refuse_a_steady_workload():
    from pytest_mm27.catalog.paths import catalog_dirs
    from pytest_mm27.catalog.workload import load_workloads
    from pytest_mm27.errors import LoadError
    from pytest_mm27.loadgen.ray_workers import run_level_on_ray

    quick = load_workloads(catalog_dirs("workloads")).get("quick")
    steady = dataclasses.replace(quick, measure="steady")
    with pytest.raises(LoadError, match="steady window, which Ray load workers do not run yet"):
        run_level_on_ray(["http://127.0.0.1:1"], "m", steady, 4, address="auto", nodes=2)


def test_tp_x_pp_with_rays_executor_holds_no_devices_itself(ray_cluster: Any, tmp_path: Path):
    harness = harness_for(ray_cluster, tmp_path, topologies=("dp2",))
    base = harness.catalog.get("tp4")
    topology = dataclasses.replace(base, name="tp2pp2", tensor_parallel=2, pipeline_parallel=2, data_parallel=1,
                                   gpus=4, placement=Placement(executor="ray"))
    deployment = harness.declare(topology)
    try:
        result = deployment.run(1)
    finally:
        harness.close()
    assert result.verdict.status != ERROR, result.verdict.message
    record = record_of(harness, "tp2pp2")
    (server,) = record["launch"]["servers"]
    argv = server["argv"]
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
    assert record["launch"]["ray"]["servers"][0]["devices"] == [], "Ray's executor places the GPU workers"
    assert "accepted, not modelled" in (harness.run_dir / "logs" / "tp2pp2-r0.log").read_text()
    assert ours_on_cluster(harness.run_id) == (set(), [])


def test_a_server_dying_at_start_fails_fast_with_its_log_tail(ray_cluster: Any, tmp_path: Path):
    harness = harness_for(ray_cluster, tmp_path, sim_faults={"startup-crash": "0.5", "startup-delay": "30"})
    try:
        result = harness.deployments["dp3"].run(1)
    finally:
        harness.close()
    assert result.verdict.status == ERROR
    text = result.verdict.message
    assert "exited during start-up (exit code 3" in text and "on node " in text, text
    assert "--- last 40 lines of" in text and "# mm27: ray node" in text, "the tail copied from the node"
    assert ours_on_cluster(harness.run_id) == (set(), [])
