"""Engines: launch plans for vllm and sim, engine selection, redaction."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pytest_mm27.engines import (
    EngineOptions,
    SimEngine,
    VllmEngine,
    get_engine,
    select_engine,
    split_devices,
)
from pytest_mm27.secrets import redact_argv, redact_env
from pytest_mm27.engines.vllm import cpu_bind, format_cores, parse_version
from pytest_mm27.errors import ConfigError
from pytest_mm27.catalog.topology import parse_topology


def make_topology(tmp_path: Path, name: str = "t", *, tp: int = 2, dp: int = 1, mode: str = "native",
                  device: str = "cuda", engines: list[str] | None = None, extra: str = ""):
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\nhardware = "rtx-pro-6000"\nconcurrency_levels = [1, 4]\nstartup_timeout_s = 900\n'
        f'device = "{device}"\n'
        + (f"engines = {json.dumps(engines)}\n" if engines is not None else "")
        + '[model]\nname = "org/Model-NVFP4"\nserved_name = "Model"\nspec = "model-nvfp4"\n'
        f'[parallel]\ntensor = {tp}\ndata = {dp}\nmode = "{mode}"\n'
        '[serve]\nmax_num_seqs = 64\ngpu_memory_utilization = 0.85\nmax_model_len = 4096\n'
        'args = ["--disable-custom-all-reduce"]\nenv = { NCCL_P2P_DISABLE = "1" }\n'
        + extra
    )
    return parse_topology(path)


def fake_vllm(tmp_path: Path, body: str = 'print("INFO some log line")\nprint("0.19.0")') -> Path:
    path = tmp_path / "bin" / "vllm"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(0o755)
    return path


VLLM = ("/opt/venv/bin/vllm",)


def test_vllm_native_dp_plan(tmp_path):
    topo = make_topology(tmp_path, "dp2", tp=2, dp=2, mode="native")
    plan = VllmEngine().plan(topo, EngineOptions(vllm_command=VLLM), [8000], [(0, 1, 2, 3)])
    assert len(plan.servers) == 1 and plan.endpoints == ("http://127.0.0.1:8000",)
    (server,) = plan.servers
    assert server.name == "dp2-r0" and server.gpus == (0, 1, 2, 3)
    assert server.argv == (
        "/opt/venv/bin/vllm", "serve", "org/Model-NVFP4", "--host", "127.0.0.1", "--port", "8000",
        "--served-model-name", "Model", "--tensor-parallel-size", "2", "--max-num-seqs", "64",
        "--gpu-memory-utilization", "0.85", "--max-model-len", "4096", "--data-parallel-size", "2",
        "--disable-custom-all-reduce",
    )
    assert server.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert server.env["NCCL_P2P_DISABLE"] == "1"
    assert server.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert plan.model == "Model" and plan.startup_timeout_s == 900 and plan.engine == "vllm"


def test_vllm_replicas_get_disjoint_gpus(tmp_path):
    topo = make_topology(tmp_path, "dp3", tp=2, dp=3, mode="replicas")
    devices = split_devices(topo, [0, 1, 2, 3, 4, 5])
    assert devices == [(0, 1), (2, 3), (4, 5)]
    plan = VllmEngine().plan(topo, EngineOptions(vllm_command=VLLM), [8001, 8002, 8003], devices)
    assert [s.name for s in plan.servers] == ["dp3-r0", "dp3-r1", "dp3-r2"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in plan.servers] == ["0,1", "2,3", "4,5"]
    assert plan.endpoints == tuple(f"http://127.0.0.1:{p}" for p in (8001, 8002, 8003))
    for server in plan.servers:
        assert "--data-parallel-size" not in server.argv
        assert server.argv[server.argv.index("--tensor-parallel-size") + 1] == "2"


def test_vllm_plan_refuses_wrong_device_sets(tmp_path):
    topo = make_topology(tmp_path, "dp3", tp=2, dp=3, mode="replicas")
    engine, opts = VllmEngine(), EngineOptions(vllm_command=VLLM)
    with pytest.raises(ConfigError, match="3 server"):
        engine.plan(topo, opts, [1, 2, 3], [(0, 1)])
    with pytest.raises(ConfigError, match="exactly 2"):
        engine.plan(topo, opts, [1, 2, 3], [(0,), (1, 2), (3, 4)])
    with pytest.raises(ConfigError, match=r"device\(s\) \[1\] given to two servers"):
        engine.plan(topo, opts, [1, 2, 3], [(0, 1), (1, 2), (3, 4)])
    with pytest.raises(ConfigError, match="needs device sets"):
        engine.plan(topo, opts, [1, 2, 3], [])
    with pytest.raises(ConfigError, match="same port"):
        engine.plan(topo, opts, [1, 1, 3], split_devices(topo, range(6)))


def test_vllm_cpu_device_binds_cores(tmp_path):
    extra = '[engine.vllm]\nenv = { VLLM_CPU_KVCACHE_SPACE = "1" }\n'
    tp2 = make_topology(tmp_path, "cpu-tp2", tp=2, device="cpu", extra=extra)
    plan = VllmEngine().plan(tp2, EngineOptions(vllm_command=VLLM), [0], [(0, 1)])
    env = plan.servers[0].env
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in env and "CUDA_DEVICE_ORDER" not in env

    reps = make_topology(tmp_path, "cpu-dp2", tp=1, dp=2, mode="replicas", device="cpu")
    plan = VllmEngine().plan(reps, EngineOptions(vllm_command=VLLM), [0, 0], split_devices(reps, [0, 1]))
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in plan.servers] == ["0", "1"]

    # More cores than ranks: each rank owns an equal block.
    plan = VllmEngine().plan(tp2, EngineOptions(vllm_command=VLLM), [0], [(0, 1, 2, 3)])
    assert plan.servers[0].env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|2-3"
    assert format_cores([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert cpu_bind([4, 5, 6, 7, 8, 9], 3) == "4-5|6-7|8-9"


def test_api_key_is_passed_but_redacted(tmp_path):
    topo = make_topology(tmp_path, "tp4", tp=4)
    opts = EngineOptions(vllm_command=VLLM, api_key="sk-live-123", extra_env={"HF_TOKEN": "hf_abc"})
    plan = VllmEngine().plan(topo, opts, [8000], [(0, 1, 2, 3)])
    server = plan.servers[0]
    i = server.argv.index("--api-key")
    assert server.argv[i + 1] == "sk-live-123" and server.env["HF_TOKEN"] == "hf_abc"
    assert server.redacted_argv()[i + 1] == "***"
    assert server.redacted_env()["HF_TOKEN"] == "***"
    assert server.redacted_env()["NCCL_P2P_DISABLE"] == "1"
    record = json.dumps(plan.to_dict())
    assert "sk-live-123" not in record and "hf_abc" not in record
    assert "sk-live-123" not in repr(server) and "sk-live-123" not in repr(opts)
    assert plan.to_dict()["servers"][0]["gpus"] == [0, 1, 2, 3]
    assert redact_argv(["--api-key=x", "--hf-token", "y", "--tokenizer", "t"]) == \
        ("--api-key=***", "--hf-token", "***", "--tokenizer", "t")
    assert redact_env({"MY_PASSWORD": "p", "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/bin"}) == \
        {"MY_PASSWORD": "***", "AWS_SECRET_ACCESS_KEY": "***", "PATH": "/bin"}


def test_vllm_dtype_and_command_forms(tmp_path):
    topo = make_topology(tmp_path, "tp1", tp=1, extra="")
    cmd = ("/venv/bin/python", "-m", "vllm.entrypoints.cli.main")
    plan = VllmEngine().plan(topo, EngineOptions(vllm_command=cmd, host="0.0.0.0"), [9000], [(3,)])
    argv = plan.servers[0].argv
    assert argv[:5] == (*cmd, "serve", "org/Model-NVFP4")
    assert plan.servers[0].env["CUDA_VISIBLE_DEVICES"] == "3"
    assert plan.endpoints == ("http://127.0.0.1:9000",)   # clients connect to loopback


def test_sim_argv(tmp_path):
    topo = make_topology(tmp_path, "dp3", tp=2, dp=3, mode="replicas")
    opts = EngineOptions(seed=10, sim_args=("--slowdown", "1.1"), api_key="k", fixtures_dir=tmp_path)
    plan = SimEngine().plan(topo, opts, [7001, 7002, 7003], [])
    assert plan.engine == "sim" and len(plan.servers) == 3 and plan.model == "Model"
    s0 = plan.servers[0]
    assert s0.argv == (
        sys.executable, "-m", "pytest_mm27.sim", "serve", "--host", "127.0.0.1", "--port", "7001",
        "--served-model-name", "Model", "--hardware", "rtx-pro-6000", "--model", "model-nvfp4",
        "--tensor-parallel-size", "2", "--data-parallel-size", "1", "--max-num-seqs", "64",
        "--max-model-len", "4096", "--gpu-memory-utilization", "0.85", "--seed", "10",
        "--api-key", "k", "--slowdown", "1.1",
    )
    assert [s.argv[s.argv.index("--seed") + 1] for s in plan.servers] == ["10", "11", "12"]
    assert s0.env["MM27_FIXTURES_DIR"] == str(tmp_path)
    assert s0.env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(__file__).resolve().parents[1])
    assert s0.gpus == ()
    assert plan.startup_timeout_s <= 120       # a simulator that hangs fails sooner than vLLM would

    native = make_topology(tmp_path, "dp2", tp=2, dp=2, mode="native")
    plan = SimEngine().plan(native, EngineOptions(), [], [])
    (server,) = plan.servers
    assert server.argv[server.argv.index("--data-parallel-size") + 1] == "2"
    assert server.port == 0 and "--api-key" not in server.argv
    assert SimEngine().plan(native, EngineOptions(startup_timeout_s=5), [], []).startup_timeout_s == 5


def test_api_server_count_reaches_both_engines(tmp_path):
    topo = make_topology(tmp_path, "t", tp=1, extra="api_server_count = 4\n")
    assert topo.api_server_count == 4
    (vllm,) = VllmEngine().plan(topo, EngineOptions(vllm_command=VLLM), [8000], [(0,)]).servers
    assert vllm.argv[vllm.argv.index("--api-server-count") + 1] == "4"
    (sim,) = SimEngine().plan(topo, EngineOptions(), [8000], []).servers
    assert sim.argv[sim.argv.index("--api-server-count") + 1] == "4"
    from pytest_mm27.sim.__main__ import build_parser

    assert build_parser().parse_args(list(sim.argv[3:])).api_server_count == 4   # after "python -m pytest_mm27.sim"
    # Unset: vLLM keeps its own default, so the flag is left out.
    plain = make_topology(tmp_path, "p", tp=1)
    assert plain.api_server_count is None
    assert "--api-server-count" not in VllmEngine().plan(plain, EngineOptions(vllm_command=VLLM), [8000], [(0,)]).servers[0].argv
    assert "--api-server-count" not in SimEngine().plan(plain, EngineOptions(), [8000], []).servers[0].argv


def test_select_engine_auto_falls_back_to_sim_here(tmp_path):
    topo = make_topology(tmp_path, "dp2", tp=2, dp=2)
    engine, reason = select_engine("auto", topo, EngineOptions(vllm_command=("vllm-not-here-xyz",)))
    assert engine.name == "sim"
    assert reason.startswith("sim (no vLLM/GPUs found")
    assert "pass --engine vllm to require real servers" in reason
    assert "'vllm-not-here-xyz' is not on PATH" in reason


def test_select_engine_explicit_vllm_missing(tmp_path):
    topo = make_topology(tmp_path, "dp2", tp=2, dp=2)
    with pytest.raises(ConfigError, match=r"--engine vllm cannot run topology 'dp2': vLLM not found"):
        select_engine("vllm", topo, EngineOptions(vllm_command=("/nonexistent/bin/vllm",)))
    with pytest.raises(ConfigError, match="cannot import vllm_not_installed_xyz"):
        select_engine("vllm", topo, EngineOptions(vllm_command=(sys.executable, "-m", "vllm_not_installed_xyz")))


def test_select_engine_vllm_found_but_no_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")       # no nvidia-smi
    topo = make_topology(tmp_path, "dp2", tp=2, dp=2)
    vllm = fake_vllm(tmp_path)
    opts = EngineOptions(vllm_command=(str(vllm),))
    with pytest.raises(ConfigError, match=r"vllm 0\.19\.0 found, but no GPUs are visible; topology 'dp2' needs 4"):
        select_engine("vllm", topo, opts)
    engine, reason = select_engine("auto", topo, opts)
    assert engine.name == "sim" and "no GPUs are visible" in reason


def test_select_engine_cpu_topology_uses_vllm_when_found(tmp_path):
    topo = make_topology(tmp_path, "cpu", tp=1, device="cpu")
    opts = EngineOptions(vllm_command=(str(fake_vllm(tmp_path)),))
    engine, reason = select_engine("auto", topo, opts)
    assert engine.name == "vllm"
    assert reason.startswith("vllm (vllm 0.19.0 found")
    assert engine.device_kind(topo) == "cpu" and engine.devices_needed(topo) == 1


def test_select_engine_respects_topology_engines(tmp_path):
    sim_only = make_topology(tmp_path, "s", engines=["sim"])
    opts = EngineOptions(vllm_command=(str(fake_vllm(tmp_path)),))
    with pytest.raises(ConfigError, match=r"does not run on the vllm engine \(its engines = \['sim'\]\)"):
        select_engine("vllm", sim_only, opts)
    engine, reason = select_engine("auto", sim_only, opts)
    assert engine.name == "sim" and "runs only on the simulator" in reason

    vllm_only = make_topology(tmp_path, "v", engines=["vllm"], extra="")
    with pytest.raises(ConfigError, match="does not run on the sim engine"):
        select_engine("sim", vllm_only, opts)
    with pytest.raises(ConfigError, match="runs only on vllm, which cannot run here"):
        select_engine("auto", vllm_only, EngineOptions(vllm_command=("vllm-not-here-xyz",)))
    with pytest.raises(ConfigError, match="unknown engine 'tgi'"):
        select_engine("tgi", vllm_only, opts)


def test_explicit_sim(tmp_path):
    engine, reason = select_engine("sim", make_topology(tmp_path), EngineOptions())
    assert engine.name == "sim" and reason == "sim (requested with --engine sim)"
    assert get_engine("vllm").name == "vllm"


def test_vllm_version_is_cached_and_tolerates_failure(tmp_path):
    counter = tmp_path / "count"
    body = (f"from pathlib import Path\np = Path({str(counter)!r})\n"
            "p.write_text(str(int(p.read_text() or 0) + 1) if p.exists() else '1')\nprint('0.20.1rc1.dev3+g1234')")
    opts = EngineOptions(vllm_command=(str(fake_vllm(tmp_path, body)),))
    assert VllmEngine().version(opts) == "0.20.1rc1.dev3+g1234"
    assert VllmEngine().version(opts) == "0.20.1rc1.dev3+g1234"
    assert counter.read_text() == "1"
    broken = tmp_path / "broken"
    broken.mkdir()
    assert VllmEngine().version(EngineOptions(vllm_command=(str(fake_vllm(broken, "raise SystemExit(2)")),))) \
        == "unknown"
    assert VllmEngine().version(EngineOptions(vllm_command=("/nonexistent/vllm",))) == "unknown"
    assert parse_version("INFO 04-01 starting\n0.19.0\n") == "0.19.0"
