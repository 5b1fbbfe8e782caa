"""Faults injected into real runs: each ends in bounded time, names its cause, keeps
the finished levels and leaves nothing running.

The end-to-end cases are the scenarios of ``python -m pytest_mm27.benchmarks.fault_suite``
(pytest subprocesses on the simulator); the rest drive the load generator, the
simulator's stream faults, ports and leases directly. Bounds are generous: the
box may be a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from pytest_mm27.benchmarks import fault_suite
from pytest_mm27.engines.base import EngineOptions
from pytest_mm27.engines.sim import SimEngine
from pytest_mm27.errors import LaunchError
from pytest_mm27.host.leases import lease_devices, lock_path
from pytest_mm27.testing import sim_topology
from pytest_mm27.host.launcher import Launcher
from pytest_mm27.loadgen import run_level
from pytest_mm27.catalog.topology import parse_topology
from pytest_mm27.catalog.workload import Workload

REPO = Path(__file__).resolve().parents[1]

# The fault suite's scenarios run here; the few left out are variations of these
# (the other signal at each moment, a floor miss mid-sweep) and run in the suite itself.
E2E = [
    "never healthy",
    "exits during start-up",
    "hangs mid-stream",
    "HTTP 500",
    "one DP replica killed",
    "SIGINT during boot",
    "SIGTERM during a level",
    "results dir under a file",
    "run folder lost mid-run",
    "two runs at once",
]


@pytest.mark.parametrize("name", E2E)
def test_fault_scenario(name, tmp_path):
    scenario = fault_suite.by_name(name)
    outcome = fault_suite.run_scenario(scenario, tmp_path / "run")
    problems = fault_suite.verdict(scenario, outcome)
    assert not problems, f"{problems}\n--- output ---\n{outcome.output[-4000:]}"


def workload(**kw) -> Workload:
    base = dict(name="t", description="", source=Path("t.toml"), input_tokens=16, output_tokens=16,
                ignore_eos=True, requests_per_concurrency=1.0, min_requests=8, duration_s=None,
                warmup_requests=0, api="completions", temperature=0.0, request_timeout_s=60.0, seed=0)
    base.update(kw)
    return Workload(**base)


def test_stall_timeout_defaults():
    assert workload(request_timeout_s=600).stall_limit_s == 150
    assert workload(request_timeout_s=120).stall_limit_s == 60
    assert workload(request_timeout_s=30).stall_limit_s == 30
    assert workload(request_timeout_s=30, stall_timeout_s=2).stall_limit_s == 2


@pytest.fixture
def half_then_silent():
    """A server that streams two chunks, then holds the connection open and says nothing."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    holder: dict = {}

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(2):
            await resp.write(b'data: {"choices":[{"index":0,"text":"w"}]}\n\n')
        await asyncio.sleep(3600)
        return resp

    async def up():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    yield asyncio.run_coroutine_threadsafe(up(), loop).result(10)
    try:
        asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
    except Exception:
        pass
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_stalled_stream_fails_with_reason_in_bounded_time(half_then_silent):
    t = time.monotonic()
    m = run_level([half_then_silent], "m", workload(stall_timeout_s=1.0, min_requests=4), 2)
    assert time.monotonic() - t < 30
    assert m.errors == {"stalled: no data for 1 s": 4}
    assert m.ok == 0 and m.output_tokens == 0 and m.output_tok_s == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sim_stream_faults_are_counted_by_reason(tmp_path):
    port = _free_port()
    argv = [sys.executable, "-m", "pytest_mm27.sim", "serve", "--port", str(port), "--served-model-name", "m",
            "--hardware", "rtx-pro-6000", "--model", "minimax-m2.7-nvfp4", "--tensor-parallel-size", "2",
            "--max-model-len", "4096", "--malformed-sse-rate", "0.3", "--cut-stream-rate", "0.4"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with (tmp_path / "sim.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "sim.log").read_text()
                time.sleep(0.1)
        m = run_level([f"http://127.0.0.1:{port}"], "m", workload(min_requests=30), 4)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    reasons = set(m.errors)
    assert "stream ended before [DONE]" in reasons
    assert any(r.startswith("malformed SSE") for r in reasons), m.errors
    assert 0 < m.failed < m.requests == 30 and m.failed == sum(m.errors.values())
    assert m.output_tokens == 16 * m.ok            # failed requests are never folded into throughput


def test_pinned_port_already_taken_is_refused_before_boot(tmp_path):
    topo_file = tmp_path / "tiny.toml"
    topo_file.write_text(sim_topology("tiny", [1], dp=1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        plan = SimEngine().plan(parse_topology(topo_file), EngineOptions(), [port])
        launcher = Launcher(plan, tmp_path / "logs")
        with pytest.raises(LaunchError, match=f"port {port} on 127.0.0.1 is taken"):
            launcher.start()
    assert launcher.stop().leftovers == ()


def test_devices_leased_by_another_run(tmp_path):
    """A second run on the host is refused with the holder named; once the holder is
    gone the lock files stay, unlocked, and the devices can be leased again."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pytest_mm27.host.leases import lease_devices
        lease = lease_devices(2, kind="cpu", candidates=[0, 1], lock_dir=Path({str(tmp_path)!r}),
                              owner="pytest-mm27 other-run")
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)), text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LaunchError) as err:
            lease_devices(1, kind="cpu", candidates=[0, 1], lock_dir=tmp_path)
        assert "pytest-mm27 other-run" in str(err.value) and f"pid {holder.pid}" in str(err.value)
        assert str(tmp_path) in str(err.value)
    finally:
        holder.kill()
        holder.wait(10)
    assert lock_path(tmp_path, "cpu", 0).exists()
    with lease_devices(2, kind="cpu", candidates=[0, 1], lock_dir=tmp_path) as lease:
        assert lease.devices == (0, 1)
