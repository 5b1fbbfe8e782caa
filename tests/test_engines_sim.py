"""The sim engine's plan booted for real by the launcher (the simulator itself)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from pytest_mm27.engines import EngineOptions, SimEngine
from pytest_mm27.host.launcher import Launcher
from pytest_mm27.catalog.topology import parse_topology


def get(url: str, key: str | None = None) -> dict:
    req = urllib.request.Request(url)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def test_sim_replicas_boot_serve_and_stop(tmp_path: Path):
    path = tmp_path / "simdp2.toml"
    path.write_text(
        'name = "simdp2"\nhardware = "rtx-pro-6000"\nconcurrency_levels = [1]\nstartup_timeout_s = 60\n'
        '[model]\nname = "lukealonso/MiniMax-M2.7-NVFP4"\nserved_name = "MiniMax-M2.7"\nspec = "minimax-m2.7-nvfp4"\n'
        '[parallel]\ntensor = 2\ndata = 2\nmode = "replicas"\n'
        '[serve]\nmax_model_len = 32768\n'
    )
    topo = parse_topology(path)
    plan = SimEngine().plan(topo, EngineOptions(api_key="sk-sim"), [], [])
    with Launcher(plan, tmp_path / "logs") as launcher:
        assert len(set(launcher.endpoints)) == 2
        for url in launcher.endpoints:
            models = get(url + "/v1/models", "sk-sim")
            assert [m["id"] for m in models["data"]] == ["MiniMax-M2.7"]
        pids = list(launcher.pids.values())
    report = launcher.teardown
    assert report is not None and report.clean, report.leftovers
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
