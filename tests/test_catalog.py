"""Topology, workload and floor files: the shipped catalog loads, broken files name file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_mm27.errors import ConfigError
from pytest_mm27.catalog.floors import load_floors
from pytest_mm27.catalog.paths import builtin_fixtures_dir, catalog_dirs
from pytest_mm27.catalog.topology import UnknownName, load_catalog, parse_topology
from pytest_mm27.catalog.workload import load_workloads, parse_workload

GOOD = """
name = "t1"
hardware = "rtx-pro-6000"
concurrency_levels = [4, 1]
[model]
name = "org/model"
spec = "minimax-m2.7-nvfp4"
[parallel]
tensor = 2
data = 3
mode = "replicas"
[serve]
max_model_len = 4096
args = ["--disable-custom-all-reduce"]
env = { NCCL_P2P_DISABLE = "1" }
"""


def write(tmp_path: Path, text: str, name: str = "t1.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_catalog_has_reference_topologies():
    catalog = load_catalog(catalog_dirs("topologies"))
    assert {"tp4-fp8", "tp4", "dp2", "dp3"} <= set(catalog.names())
    dp3 = catalog.get("dp3")
    assert (dp3.tensor_parallel, dp3.data_parallel, dp3.dp_mode, dp3.gpus) == (2, 3, "replicas", 6)
    assert dp3.concurrency_levels == (1, 4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 896)
    assert "--disable-custom-all-reduce" in dp3.vllm_args
    assert dp3.env["NCCL_P2P_DISABLE"] == "1"
    assert catalog.get("dp2").dp_mode == "native"


def test_shipped_workloads_and_headline_floor():
    workloads = load_workloads(catalog_dirs("workloads"))
    assert {"default", "quick"} <= set(workloads.names())
    assert workloads.get("default").requests_for(640) == 1280
    assert workloads.get("quick").requests_for(1) == 2
    floors = load_floors([builtin_fixtures_dir() / "floors"], "rtx-pro-6000")
    floor = floors.get("dp3", "default", 640)
    assert floor is not None and floor.tok_s == 10000


def test_good_topology_parses(tmp_path):
    topo = parse_topology(write(tmp_path, GOOD))
    assert topo.concurrency_levels == (1, 4)
    assert topo.replicas == 3 and topo.gpus_per_server == 2
    assert topo.model.served_name == "org/model"
    assert topo.to_dict()["env"] == {"NCCL_P2P_DISABLE": "1"}
    assert (topo.workload, topo.api_server_count) == ("default", None)
    assert (topo.to_dict()["workload"], topo.to_dict()["api_server_count"]) == ("default", None)


def test_topology_names_its_workload_and_api_server_count(tmp_path):
    text = GOOD.replace('hardware = "rtx-pro-6000"\n', 'hardware = "rtx-pro-6000"\nworkload = "quick"\n')
    topo = parse_topology(write(tmp_path, text.replace("max_model_len = 4096", "max_model_len = 4096\napi_server_count = 2")))
    assert (topo.workload, topo.api_server_count) == ("quick", 2)
    assert (topo.to_dict()["workload"], topo.to_dict()["api_server_count"]) == ("quick", 2)


def test_shipped_topologies_name_workloads_that_exist():
    catalog = load_catalog(catalog_dirs("topologies"))
    workloads = load_workloads(catalog_dirs("workloads"))
    for topo in catalog.select(["all"]):
        workloads.get(topo.workload)
        if topo.name.startswith("gpu-"):
            assert topo.workload == "gpu-small", topo.name
        elif topo.name.startswith("tiny-"):
            assert topo.workload == "tiny", topo.name
        else:
            assert topo.workload == "default", topo.name


def test_gpu_8b_topology():
    topo = load_catalog(catalog_dirs("topologies")).get("gpu-8b-tp1")
    assert (topo.model.make, topo.model.spec, topo.tensor_parallel, topo.gpus) == ("llama-8b-shape", "llama-8b-shape", 1, 1)
    assert (topo.hardware, topo.concurrency_levels, topo.max_model_len) == ("h100-sxm", (1, 16, 64), 4096)
    assert "dummy" in topo.vllm_args and "bfloat16" in topo.vllm_args
    assert topo.startup_timeout_s >= 600


@pytest.mark.parametrize("old,new,field", [
    ("tensor = 2", 'tensor = "two"', "parallel.tensor"),
    ("tensor = 2", "tensor = 0", "parallel.tensor"),
    ('mode = "replicas"', 'mode = "sideways"', "parallel.mode"),
    ("concurrency_levels = [4, 1]", "concurrency_levels = [4, -1]", "concurrency_levels"),
    ("concurrency_levels = [4, 1]", "concurrency_levels = []", "concurrency_levels"),
    ('hardware = "rtx-pro-6000"\n', "", "hardware"),
    ("max_model_len = 4096", "max_model_len = 4096\nmax_num_seq = 8", "serve.max_num_seq"),
    ('env = { NCCL_P2P_DISABLE = "1" }', "env = { NCCL_P2P_DISABLE = 1 }", "serve.env.NCCL_P2P_DISABLE"),
    ('spec = "minimax-m2.7-nvfp4"\n', "", "model.spec"),
    ("max_model_len = 4096", "max_model_len = 4096\napi_server_count = 0", "serve.api_server_count"),
    ("max_model_len = 4096", 'max_model_len = 4096\napi_server_count = "2"', "serve.api_server_count"),
    ("max_model_len = 4096", "max_model_len = 4096\napi_server_count = 1.5", "serve.api_server_count"),
    ('hardware = "rtx-pro-6000"\n', 'hardware = "rtx-pro-6000"\nworkload = ""\n', "workload"),
    ('hardware = "rtx-pro-6000"\n', 'hardware = "rtx-pro-6000"\nworkload = 3\n', "workload"),
])
def test_broken_topology_names_file_and_field(tmp_path, old, new, field):
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError) as info:
        parse_topology(path)
    assert str(path) in str(info.value)
    assert f"field '{field}'" in str(info.value)


def test_invalid_toml_names_file(tmp_path):
    path = write(tmp_path, "name = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        parse_topology(path)
    assert str(path) in str(info.value)


def test_unknown_name_lists_known(tmp_path):
    write(tmp_path, GOOD)
    catalog = load_catalog([tmp_path])
    with pytest.raises(UnknownName, match=r"unknown topology 'nope'; known: t1"):
        catalog.get("nope")
    assert [t.name for t in catalog.select(["all"])] == ["t1"]


def test_user_folder_shadows_builtin(tmp_path):
    write(tmp_path, GOOD.replace('name = "t1"', 'name = "dp3"'), "mine.toml")
    catalog = load_catalog([tmp_path, *catalog_dirs("topologies")])
    assert catalog.get("dp3").source == tmp_path / "mine.toml"


def test_duplicate_names_in_one_folder(tmp_path):
    write(tmp_path, GOOD, "a.toml")
    write(tmp_path, GOOD, "b.toml")
    with pytest.raises(ConfigError, match="also defined"):
        load_catalog([tmp_path])


def test_broken_workload(tmp_path):
    path = write(tmp_path, "input_tokens = 10\noutput_tokens = 'many'\n", "w.toml")
    with pytest.raises(ConfigError, match=r"field 'output_tokens'"):
        parse_workload(path)


def test_broken_floor_file(tmp_path):
    (tmp_path / "hw.toml").write_text('[[floor]]\ntopology = "t"\nworkload = "w"\nconcurrency = 0\n'
                                      'tok_s = 5\nnote = "x"\n')
    with pytest.raises(ConfigError, match=r"field 'floor\[0\].concurrency'"):
        load_floors([tmp_path], "hw")
