"""Placement on a Ray cluster, without Ray: the [placement] table, the node choice, the keeper, the options."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pytest_mm27.catalog.topology import Placement, parse_topology
from pytest_mm27.cluster.placement import NodeCapacity, ServerDemand, assign
from pytest_mm27.config import build_config
from pytest_mm27.errors import ConfigError, PlacementUnsatisfiable

REPO = Path(__file__).resolve().parents[1]


def node(i: int, gpus: float, free: float | None = None, alive: bool = True) -> NodeCapacity:
    total = {"CPU": 4.0, "GPU": gpus} if gpus else {"CPU": 4.0}
    free_r = {**total, "GPU": gpus if free is None else free} if gpus else dict(total)
    return NodeCapacity(node_id=f"{i:08x}" + "f" * 48, address=f"10.0.0.{i}", total=total, free=free_r, alive=alive)


def demands(n: int, devices: int) -> list[ServerDemand]:
    return [ServerDemand(f"t-r{i}", devices) for i in range(n)]


def test_replicas_spread_one_per_node_then_round_robin():
    nodes = [node(1, 4), node(2, 4), node(3, 4)]
    chosen = assign("t", demands(3, 2), nodes, Placement())
    assert [n.address for n in chosen] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    chosen = assign("t", demands(5, 2), nodes, Placement())
    assert [n.address for n in chosen] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1", "10.0.0.2"]


def test_nodes_caps_how_many_nodes_are_used():
    nodes = [node(1, 4), node(2, 4), node(3, 4)]
    chosen = assign("t", demands(4, 2), nodes, Placement(nodes=2))
    assert sorted(n.address for n in chosen) == ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]


def test_head_without_gpus_and_busy_gpus_are_skipped():
    nodes = [node(0, 0), node(1, 2, free=0), node(2, 2), node(3, 2)]
    chosen = assign("t", demands(2, 2), nodes, Placement())
    assert [n.address for n in chosen] == ["10.0.0.2", "10.0.0.3"]


def test_a_dead_node_takes_nothing():
    chosen = assign("t", demands(1, 2), [node(1, 2, alive=False), node(2, 2)], Placement())
    assert chosen[0].address == "10.0.0.2"


def test_unsatisfiable_says_what_the_cluster_has():
    nodes = [node(0, 0), node(1, 2), node(2, 2, free=1)]
    with pytest.raises(PlacementUnsatisfiable) as info:
        assign("big", demands(2, 4), nodes, Placement())
    text = str(info.value)
    assert "topology 'big'" in text and "2 server(s) of 4 GPU each, each on one node" in text
    assert "node 00000001 (10.0.0.1): GPU 2 free of 2" in text
    assert "node 00000002 (10.0.0.2): GPU 1 free of 2" in text
    assert "node 00000000 (10.0.0.0): no GPU" in text
    assert "Nothing was started" in text


def test_gpus_per_node_and_node_count_are_required():
    nodes = [node(1, 2), node(2, 8)]
    with pytest.raises(PlacementUnsatisfiable, match="spread over 3 node"):
        assign("t", demands(3, 2), nodes, Placement(nodes=3))
    with pytest.raises(PlacementUnsatisfiable, match="offering at least 8 GPU"):
        assign("t", demands(2, 2), nodes, Placement(nodes=2, gpus_per_node=8))
    chosen = assign("t", demands(2, 2), nodes, Placement(gpus_per_node=8))
    assert [n.address for n in chosen] == ["10.0.0.2", "10.0.0.2"]


def test_custom_resource_name():
    labelled = NodeCapacity("a" * 56, "10.0.0.9", total={"accel": 2.0}, free={"accel": 2.0})
    assert assign("t", demands(1, 2), [node(1, 2), labelled], Placement(resource="accel"))[0].address == "10.0.0.9"


TOPOLOGY = """
name = "t"
hardware = "rtx-pro-6000"
concurrency_levels = [1]
[model]
name = "m"
spec = "minimax-m2.7-nvfp4"
[parallel]
tensor = {tp}
data = 3
mode = "replicas"
[serve]
max_model_len = 4096
{placement}
"""


def topology_file(tmp_path: Path, placement: str, tp: int = 2) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(TOPOLOGY.format(tp=tp, placement=placement))
    return path


def test_placement_table_parsed_and_recorded(tmp_path: Path):
    topo = parse_topology(topology_file(tmp_path, "[placement]\nnodes = 3\ngpus_per_node = 2\n"))
    assert topo.placement == Placement(nodes=3, gpus_per_node=2, resource="GPU")
    assert topo.to_dict()["placement"] == {"nodes": 3, "gpus_per_node": 2, "resource": "GPU", "dp_backend": "mp",
                                               "executor": "mp"}
    assert parse_topology(topology_file(tmp_path, "")).placement is None


@pytest.mark.parametrize("table, field, words", [
    ("[placement]\ngpus_per_node = 1\n", "placement.gpus_per_node", "must sit on one node"),
    ("[placement]\nnodes = 4\n", "placement.nodes", "a node would stay empty"),
    ("[placement]\nnodes = 2\ngpus_per_node = 2\n", "placement", "hold fewer than"),
    ("[placement]\nnode = 2\n", "placement.node", ""),
])
def test_bad_placement_names_file_and_field(tmp_path: Path, table: str, field: str, words: str):
    path = topology_file(tmp_path, table)
    with pytest.raises(ConfigError) as info:
        parse_topology(path)
    assert str(path) in str(info.value) and field in str(info.value) and words in str(info.value)


def getter(values: dict[str, object]):
    return lambda name: values.get(name)


@pytest.mark.parametrize("address", ["auto", "ray://head.example:10001", "10.1.2.3:6379"])
def test_ray_address_accepted(address: str):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'pytest-mm27[ray]')")
    assert build_config(getter({"ray_address": address}), REPO).ray_address == address


def test_bad_ray_address_is_refused():
    with pytest.raises(ConfigError, match="ini: field 'mm27_ray_address'.*ray://HOST:PORT"):
        build_config(getter({"ray_address": "http://head"}), REPO)


def test_missing_ray_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    import pytest_mm27.cluster.connect as connect
    monkeypatch.setattr(connect, "ray_available", lambda: False)
    with pytest.raises(ConfigError, match=r"Ray is not installed here \(pip install 'pytest-mm27\[ray\]'\)"):
        build_config(getter({"ray_address": "auto"}), REPO)


def test_without_ray_address_nothing_changes():
    assert build_config(getter({}), REPO).ray_address is None


PARENT = textwrap.dedent("""
    import subprocess, sys, time
    keeper = subprocess.Popen([sys.executable, "-m", "pytest_mm27.cluster.keeper", str(__import__("os").getpid()),
                               "--", sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    print(keeper.pid, flush=True)
    time.sleep(600)
""")


def _family_of(pid: int, timeout: float = 10.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(pid).children(recursive=True)
        if kids:
            return [psutil.Process(pid), *kids]
        time.sleep(0.1)
    raise AssertionError(f"keeper {pid} started no server")


def _gone(procs: list[psutil.Process], timeout: float = 15.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_keeper_stops_the_server_when_its_actor_dies():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, env=env)
    try:
        assert parent.stdout is not None
        keeper_pid = int(parent.stdout.readline())
        family = _family_of(keeper_pid)
        parent.kill()           # as a raylet's death takes its actor with it
        parent.wait()
        assert not _gone(family), "the keeper left its server running after its actor died"
    finally:
        parent.kill()


def test_keeper_exits_with_the_servers_status(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pytest_mm27.cluster.keeper", str(os.getpid()), "--",
                           sys.executable, "-c", "raise SystemExit(7)"], env=env, timeout=60)
    assert done.returncode == 7
    killed = subprocess.Popen([sys.executable, "-m", "pytest_mm27.cluster.keeper", str(os.getpid()), "--",
                               sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                              start_new_session=True)
    family = _family_of(killed.pid)
    os.killpg(killed.pid, signal.SIGTERM)      # teardown signals the whole group
    assert killed.wait(timeout=30) == -signal.SIGTERM
    assert not _gone(family)


def test_server_follows_a_keeper_killed_outright():
    """Ray SIGKILLs a dead worker's children (the keeper) before they can act: the server must still go."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    keeper = subprocess.Popen([sys.executable, "-m", "pytest_mm27.cluster.keeper", str(os.getpid()), "--",
                               sys.executable, "-c", "import time; time.sleep(600)"], env=env,
                              start_new_session=True)
    family = _family_of(keeper.pid)
    keeper.kill()
    keeper.wait()
    assert not _gone(family), "the server outlived its keeper"


def _plan(engine_name: str, placement: Placement, cluster: bool = True):
    import dataclasses

    from pytest_mm27.catalog.paths import catalog_dirs
    from pytest_mm27.catalog.topology import load_catalog
    from pytest_mm27.engines import get_engine
    from pytest_mm27.engines.base import EngineOptions

    dp2 = load_catalog(catalog_dirs("topologies")).get("dp2")       # native, TP=2 x DP=2
    topo = dataclasses.replace(dp2, data_parallel=4, gpus=8, placement=placement)
    engine = get_engine(engine_name)
    devices = [tuple(range(8))] if engine_name == "vllm" else ()
    return engine.plan(topo, EngineOptions(cluster=cluster), devices=devices)


def _flag(argv: tuple[str, ...], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("engine", ["vllm", "sim"])
def test_native_dp_over_nodes_is_a_head_and_headless_ranks(engine: str):
    from pytest_mm27.host.plan import HEAD_ADDRESS, HEAD_RPC_PORT

    plan = _plan(engine, Placement(nodes=2))
    head, rank = plan.servers
    assert plan.endpoints == (head.base_url,)
    assert (head.serves, rank.serves) == (True, False)
    assert rank.name == "dp2-rank2"
    for spec in (head, rank):
        assert spec.argv.count("--data-parallel-size") == 1 and _flag(spec.argv, "--data-parallel-size") == "4"
        assert _flag(spec.argv, "--data-parallel-size-local") == "2"
        assert _flag(spec.argv, "--data-parallel-address") == HEAD_ADDRESS
        assert _flag(spec.argv, "--data-parallel-rpc-port") == HEAD_RPC_PORT
        assert len(spec.gpus) == 4          # two local ranks of TP=2 on each node
    assert "--headless" not in head.argv and "--headless" in rank.argv
    assert _flag(rank.argv, "--data-parallel-start-rank") == "2"


def test_native_dp_with_rays_backend_is_one_command_holding_no_devices():
    (head,) = _plan("vllm", Placement(nodes=2, dp_backend="ray")).servers
    assert _flag(head.argv, "--data-parallel-backend") == "ray" and head.gpus == ()
    assert "--headless" not in head.argv and head.env["RAY_ADDRESS"] == "auto"


def test_without_a_cluster_native_dp_stays_one_server():
    plan = _plan("vllm", Placement(nodes=2), cluster=False)
    assert len(plan.servers) == 1 and "--data-parallel-size-local" not in plan.servers[0].argv


def test_uneven_dp_over_nodes_is_refused(tmp_path: Path):
    text = TOPOLOGY.format(tp=2, placement="[placement]\nnodes = 2\n").replace('mode = "replicas"', 'mode = "native"')
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="placement.nodes.*3 ranks do not divide evenly"):
        parse_topology(path)


def test_simulator_accepts_vllms_multi_node_flags():
    from pytest_mm27.sim.__main__ import build_parser

    args = build_parser().parse_args([
        "serve", "--served-model-name", "m", "--hardware", "h", "--model", "m", "--data-parallel-size", "4",
        "--data-parallel-size-local", "2", "--data-parallel-address", "10.0.0.1", "--data-parallel-rpc-port",
        "13345", "--headless", "--data-parallel-start-rank", "2", "--data-parallel-backend", "mp"])
    assert (args.headless, args.data_parallel_start_rank, args.data_parallel_size_local) == (True, 2, 2)


def test_help_lists_ray_address(pytester: pytest.Pytester):
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--ray-address=ADDR*", "*mm27_ray_address*"])


def test_ray_load_workers_need_a_cluster():
    with pytest.raises(ConfigError, match="--ray-load-workers runs the load on a Ray cluster"):
        build_config(getter({"ray_load_workers": "2"}), REPO)


def test_pipeline_parallel_counts_its_gpus_and_reaches_the_command(tmp_path: Path):
    text = TOPOLOGY.format(tp=2, placement="").replace("data = 3", "data = 1\npipeline = 2")
    path = tmp_path / "t.toml"
    path.write_text(text)
    topo = parse_topology(path)
    assert (topo.gpus, topo.gpus_per_server, topo.pipeline_parallel) == (4, 4, 2)
    from pytest_mm27.engines import get_engine
    from pytest_mm27.engines.base import EngineOptions

    plan = get_engine("vllm").plan(topo, EngineOptions(), devices=[(0, 1, 2, 3)])
    assert _flag(plan.servers[0].argv, "--pipeline-parallel-size") == "2"
    assert plan.servers[0].env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("pipeline = 2", "pipeline = 2\ngpus = 2"))
    with pytest.raises(ConfigError, match="parallel.gpus.*tensor x pipeline x data = 4"):
        parse_topology(bad)


def test_rays_executor_lets_a_server_span_nodes(tmp_path: Path):
    text = TOPOLOGY.format(tp=4, placement='[placement]\ngpus_per_node = 2\nexecutor = "ray"\n').replace(
        "data = 3", "data = 1\npipeline = 2")
    path = tmp_path / "t.toml"
    path.write_text(text)
    topo = parse_topology(path)         # TP=4 on 2-GPU nodes: allowed, Ray places the workers
    from pytest_mm27.engines import get_engine
    from pytest_mm27.engines.base import EngineOptions

    (server,) = get_engine("vllm").plan(topo, EngineOptions(cluster=True), devices=[tuple(range(8))]).servers
    assert _flag(server.argv, "--distributed-executor-backend") == "ray" and server.gpus == ()
    assert _flag(server.argv, "--pipeline-parallel-size") == "2" and server.env["RAY_ADDRESS"] == "auto"
    with pytest.raises(ConfigError, match="must sit on one node"):
        bad = tmp_path / "bad.toml"
        bad.write_text(text.replace('executor = "ray"\n', ""))
        parse_topology(bad)


def test_bad_ray_address_on_the_command_line_is_a_usage_error(pytester: pytest.Pytester):
    result = pytester.runpytest_subprocess("--ray-address", "http://head")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ray-address must be 'auto', ray://HOST:PORT or a head's HOST:PORT*"])
