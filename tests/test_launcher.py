"""Launcher: real child processes (stand-in servers), no mocks of our code."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from pytest_mm27.host.plan import LaunchPlan, ServerSpec, make_base_url
from pytest_mm27.errors import LaunchError
from pytest_mm27.host.launcher import Launcher
from pytest_mm27.host.ports import free_port, port_in_use
from pytest_mm27.host.serverlog import read_log_tail
from pytest_mm27.catalog.topology import parse_topology

# A stand-in for `vllm serve` / the simulator: stdlib only, so it starts fast.
STANDIN = r'''
import argparse, json, os, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, required=True)
p.add_argument("--model", default="standin")
p.add_argument("--api-key")
p.add_argument("--mode", default="healthy",
               choices=["healthy", "crash", "never-healthy", "no-listen", "addr-in-use-once"])
p.add_argument("--delay", type=float, default=0.0)
p.add_argument("--spawn", type=int, default=0, help="grandchildren to start (like EngineCore)")
p.add_argument("--spawn-setsid", action="store_true", help="grandchildren leave our group")
p.add_argument("--ignore-term", action="store_true")
p.add_argument("--die-when", help="exit(7) once this file exists")
p.add_argument("--marker")
a = p.parse_args()

print(f"standin {a.mode} pid {os.getpid()} port {a.port}", flush=True)
if a.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
for i in range(a.spawn):
    code = "import signal, time\n"
    if a.ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    code += "time.sleep(3600)\n"
    subprocess.Popen([sys.executable, "-c", code], start_new_session=a.spawn_setsid)
if a.mode == "crash":
    for i in range(60):
        print(f"loading shard {i}", flush=True)
    print("RuntimeError: CUDA out of memory (standin)", flush=True)
    sys.exit(3)
if a.mode == "addr-in-use-once" and not os.path.exists(a.marker):
    open(a.marker, "w").close()
    print("OSError: [Errno 98] Address already in use", flush=True)
    sys.exit(1)
time.sleep(a.delay)
if a.mode == "no-listen":
    time.sleep(3600)

class H(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        if self.path == "/health":
            return self._send(503 if a.mode == "never-healthy" else 200, {})
        if self.path == "/v1/models":
            if a.api_key and self.headers.get("Authorization") != f"Bearer {a.api_key}":
                return self._send(401, {"error": "bad key"})
            return self._send(200, {"object": "list", "data": [{"id": a.model, "object": "model"}]})
        self._send(404, {})

srv = ThreadingHTTPServer((a.host, a.port), H)
print("listening", flush=True)
if a.die_when:
    import threading
    def watch():
        while not os.path.exists(a.die_when):
            time.sleep(0.05)
        print("dying on request", flush=True)
        os._exit(7)
    threading.Thread(target=watch, daemon=True).start()
srv.serve_forever()
'''


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    path = tmp_path / "standin.py"
    path.write_text(STANDIN)
    return path


@pytest.fixture
def topology(tmp_path: Path):
    path = tmp_path / "standin.toml"
    path.write_text(
        'name = "standin"\nhardware = "test"\nconcurrency_levels = [1]\nstartup_timeout_s = 30\n'
        '[model]\nname = "standin"\nspec = "standin"\n'
        '[parallel]\ntensor = 1\ndata = 2\nmode = "replicas"\n'
        '[serve]\nmax_model_len = 128\n'
    )
    return parse_topology(path)


def make_plan(topology, standin: Path, *server_args: list[str], timeout: float = 30.0,
              api_key: str | None = None, ports: list[int] | None = None) -> LaunchPlan:
    servers = []
    for i, extra in enumerate(server_args):
        port = ports[i] if ports else 0
        argv = (sys.executable, str(standin), "--port", str(port), "--model", "standin",
                *(["--api-key", api_key] if api_key else []), *extra)
        servers.append(ServerSpec(name=f"standin-r{i}", argv=argv, env={"MM27_TEST_TOKEN": "s3cret"},
                                  host="127.0.0.1", port=port, gpus=(i,), base_url=make_base_url("127.0.0.1", port),
                                  api_key=api_key))
    return LaunchPlan(topology=topology, engine="sim", servers=tuple(servers),
                      endpoints=tuple(s.base_url for s in servers), model="standin", startup_timeout_s=timeout)


def proc_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group or session is ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        if fields[0] != "Z" and (int(fields[2]) == pgid or int(fields[3]) == pgid):
            out.append(int(entry))
    return out


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(raw[raw.rfind(")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


def get_json(url: str, key: str | None = None) -> dict:
    import urllib.request

    req = urllib.request.Request(url)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as resp:
        return json.loads(resp.read())


def test_healthy_boot_of_two_servers_then_stop_leaves_nothing(topology, standin, tmp_path):
    plan = make_plan(topology, standin, [], [], api_key="sk-secret-123")
    with Launcher(plan, tmp_path / "logs") as launcher:
        assert len(launcher.endpoints) == 2
        assert all(":0" not in url for url in launcher.endpoints)   # picked ports are filled in
        assert len(set(launcher.endpoints)) == 2
        assert launcher.endpoints == tuple(s.base_url for s in launcher.plan.servers)
        for url in launcher.endpoints:
            assert get_json(url + "/v1/models", "sk-secret-123")["data"][0]["id"] == "standin"
        pids = list(launcher.pids.values())
        assert all(pid_alive(p) for p in pids)
        launcher.check_alive()
        logs = launcher.log_paths
    report = launcher.teardown
    assert report is not None and report.clean, report
    assert not report.killed            # SIGTERM was enough
    for pid in pids:
        assert not pid_alive(pid)
        assert proc_group_members(pid) == []
    # The command line is logged at the top, with secrets masked.
    head = logs["standin-r0"].read_text()
    assert "# mm27: command:" in head and "--api-key '***'" in head
    assert "sk-secret-123" not in head and "s3cret" not in head
    assert launcher.stop() is report    # idempotent


def test_crash_at_start_fails_fast_with_log_tail(topology, standin, tmp_path):
    plan = make_plan(topology, standin, [], ["--mode", "crash"], timeout=120)
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        Launcher(plan, tmp_path / "logs").launch()
    elapsed = time.monotonic() - t0
    msg = str(info.value)
    assert "standin-r1" in msg and "exit code 3" in msg and "during start-up" in msg
    assert "CUDA out of memory (standin)" in msg
    assert "loading shard 59" in msg and "loading shard 5\n" not in msg   # only the tail
    assert elapsed < 60                  # far below the 120 s timeout, even on a loaded box


def wait_for_log(launcher: Launcher, name: str, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in launcher.log_paths[name].read_text():
        assert time.monotonic() < deadline, f"{name} never logged {text!r}"
        time.sleep(0.05)


def test_never_healthy_hits_startup_timeout(topology, standin, tmp_path):
    plan = make_plan(topology, standin, [], ["--mode", "never-healthy"], timeout=3)
    launcher = Launcher(plan, tmp_path / "logs")
    launcher.start()
    for name in ("standin-r0", "standin-r1"):   # the clock starts once both listen, however loaded the box
        wait_for_log(launcher, name, "listening")
    with pytest.raises(LaunchError) as info:
        launcher.wait_healthy()
    msg = str(info.value)
    assert "1 of 2 server(s) not healthy after the 3 s start-up timeout" in msg
    assert "standin-r1 (GET /health: HTTP 503)" in msg
    assert "standin never-healthy" in msg       # its log tail
    assert "standin-r0 (" not in msg
    assert launcher.teardown is not None and launcher.teardown.clean


def test_not_listening_timeout_says_so(topology, standin, tmp_path):
    plan = make_plan(topology, standin, ["--mode", "no-listen"], timeout=2)
    with pytest.raises(LaunchError, match=r"standin-r0 \(GET /health: connection refused"):
        Launcher(plan, tmp_path / "logs").launch()


def test_grandchildren_are_killed_even_if_they_leave_the_group(topology, standin, tmp_path):
    plan = make_plan(topology, standin, ["--spawn", "2"], ["--spawn", "1", "--spawn-setsid"])
    launcher = Launcher(plan, tmp_path / "logs")
    launcher.launch()
    pids = launcher.pids
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (len(children_of(pids["standin-r0"])) < 2
                                          or len(children_of(pids["standin-r1"])) < 1):
        time.sleep(0.05)
    grandchildren = children_of(pids["standin-r0"]) + children_of(pids["standin-r1"])
    assert len(grandchildren) == 3
    report = launcher.stop()
    assert report.clean, report.leftovers
    for pid in [*pids.values(), *grandchildren]:
        assert not pid_alive(pid)


def test_sigterm_ignoring_child_is_sigkilled(topology, standin, tmp_path):
    plan = make_plan(topology, standin, ["--ignore-term", "--spawn", "1"])
    launcher = Launcher(plan, tmp_path / "logs", grace_s=1.0)
    launcher.launch()
    pid = launcher.pids["standin-r0"]
    report = launcher.stop()
    assert report.killed == ("standin-r0",)
    assert report.exit_codes["standin-r0"] == -signal.SIGKILL
    assert report.clean and proc_group_members(pid) == []


def test_check_alive_detects_death(topology, standin, tmp_path):
    trigger = tmp_path / "die"
    plan = make_plan(topology, standin, [], ["--die-when", str(trigger)])
    with Launcher(plan, tmp_path / "logs") as launcher:
        launcher.check_alive()
        trigger.touch()
        deadline = time.monotonic() + 30
        with pytest.raises(LaunchError) as info:
            while time.monotonic() < deadline:
                launcher.check_alive()
                time.sleep(0.05)
        msg = str(info.value)
        assert "standin-r1 exited while serving (exit code 7" in msg
        assert "dying on request" in msg
    assert launcher.teardown is not None and launcher.teardown.clean


def test_pinned_port_taken_is_refused_before_booting(topology, standin, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        plan = make_plan(topology, standin, [], ports=[port])
        launcher = Launcher(plan, tmp_path / "logs")
        with pytest.raises(LaunchError, match=rf"port {port} on 127.0.0.1 is taken \(wanted by server standin-r0\)"):
            launcher.launch()
        assert launcher.pids == {}       # nothing was started


def test_pinned_free_port_is_used(topology, standin, tmp_path):
    port = free_port("127.0.0.1")
    assert not port_in_use("127.0.0.1", port)
    with Launcher(make_plan(topology, standin, [], ports=[port]), tmp_path / "logs") as launcher:
        assert launcher.endpoints == (f"http://127.0.0.1:{port}",)


def test_address_in_use_retries_once_with_a_fresh_port(topology, standin, tmp_path):
    marker = tmp_path / "marker"
    plan = make_plan(topology, standin, ["--mode", "addr-in-use-once", "--marker", str(marker)])
    with Launcher(plan, tmp_path / "logs") as launcher:
        assert marker.exists()
        first_port = int(read_log_tail(launcher.log_paths["standin-r0"], 1000).split("port ")[1].split()[0])
        url = launcher.endpoints[0]
        assert get_json(url + "/health") == {}
        assert not url.endswith(f":{first_port}")
        assert launcher.plan.servers[0].base_url == url
        assert "retry on port" in launcher.log_paths["standin-r0"].read_text()


def test_wrong_api_key_fails_fast(topology, standin, tmp_path):
    plan = make_plan(topology, standin, ["--api-key", "other"])
    with pytest.raises(LaunchError, match="API key"):
        Launcher(plan, tmp_path / "logs").launch()


def test_missing_executable_is_a_clear_error(topology, tmp_path):
    spec = ServerSpec(name="x-r0", argv=("/nonexistent/vllm", "serve"), env={}, host="127.0.0.1", port=0,
                      gpus=(), base_url="http://127.0.0.1:0")
    plan = LaunchPlan(topology=topology, engine="vllm", servers=(spec,), endpoints=(spec.base_url,),
                      model="m", startup_timeout_s=5)
    with pytest.raises(LaunchError, match="cannot run '/nonexistent/vllm'"):
        Launcher(plan, tmp_path / "logs").launch()


def test_dev_shm_leftovers_of_children_are_removed(topology, standin, tmp_path):
    # A child that creates a torch-like segment and dies without unlinking it.
    name = f"torch_mm27test_{os.getpid()}"
    script = tmp_path / "shm.py"
    script.write_text(
        "import sys, runpy\n"
        f"open('/dev/shm/{name}', 'w').write('x')\n"
        f"sys.argv = [{str(standin)!r}] + sys.argv[1:]\n"
        f"runpy.run_path({str(standin)!r}, run_name='__main__')\n"
    )
    plan = make_plan(topology, script, [])
    with Launcher(plan, tmp_path / "logs"):
        assert Path(f"/dev/shm/{name}").exists()
    assert not Path(f"/dev/shm/{name}").exists()


def test_stop_before_start_and_twice_is_harmless(topology, standin, tmp_path):
    launcher = Launcher(make_plan(topology, standin, []), tmp_path / "logs")
    first = launcher.stop()
    assert first.clean and launcher.stop() is first


def test_keyboard_interrupt_during_wait_stops_servers(topology, standin, tmp_path):
    plan = make_plan(topology, standin, ["--mode", "no-listen", "--spawn", "1"], timeout=60)
    launcher = Launcher(plan, tmp_path / "logs")
    launcher.start()
    pid = launcher.pids["standin-r0"]

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.alarm(1)
        with pytest.raises(KeyboardInterrupt):
            launcher.wait_healthy()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert launcher.teardown is not None and launcher.teardown.clean
    assert proc_group_members(pid) == []


def test_crashed_parent_leaves_no_children(topology, standin, tmp_path):
    """The atexit hook stops servers when the owning Python process exits uncleanly."""
    pidfile = tmp_path / "pids.json"
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_launcher import make_plan
from pytest_mm27.host.launcher import Launcher
from pytest_mm27.catalog.topology import parse_topology
topo = parse_topology(Path({str(topology.source)!r}))
l = Launcher(make_plan(topo, Path({str(standin)!r}), ["--spawn", "1"]), Path({str(tmp_path / 'logs')!r}))
l.launch()
Path({str(pidfile)!r}).write_text(json.dumps(list(l.pids.values())))
raise RuntimeError("the test run crashed")
"""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert "the test run crashed" in proc.stderr
    pids = json.loads(pidfile.read_text())
    for pid in pids:
        assert proc_group_members(pid) == []


def test_sigterm_to_the_owner_stops_servers_with_signal_handlers(topology, standin, tmp_path):
    pidfile = tmp_path / "pids.json"
    code = f"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_launcher import make_plan
from pytest_mm27.host.exits import install_signal_handlers
from pytest_mm27.host.launcher import Launcher
from pytest_mm27.catalog.topology import parse_topology
install_signal_handlers()
topo = parse_topology(Path({str(topology.source)!r}))
l = Launcher(make_plan(topo, Path({str(standin)!r}), ["--spawn", "1"]), Path({str(tmp_path / 'logs')!r}))
l.launch()
Path({str(pidfile)!r}).write_text(json.dumps(list(l.pids.values())))
time.sleep(120)
"""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists() or not pidfile.read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pids = json.loads(pidfile.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM     # exits as SIGTERM asked, after cleaning up
    finally:
        if proc.poll() is None:
            proc.kill()
    for pid in pids:
        assert proc_group_members(pid) == []


def test_teardown_reports_gpu_memory_not_freed(topology, standin, tmp_path, monkeypatch):
    import pytest_mm27.host.launcher as launcher_mod

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!{sys.executable}\nprint('1, GPU-b, Fake GPU, 97887, 45000, 575.0')\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(launcher_mod, "GPU_FREE_WAIT_S", 0.5)
    plan = make_plan(topology, standin, [])
    plan = LaunchPlan(topology=plan.topology, engine="vllm", servers=plan.servers, endpoints=plan.endpoints,
                      model=plan.model, startup_timeout_s=30)
    plan = plan.with_server(0, dataclasses.replace(plan.servers[0], gpus=(1,)))
    with Launcher(plan, tmp_path / "logs") as launcher:
        pass
    report = launcher.teardown
    assert report is not None and not report.leftovers
    assert report.gpu_memory_in_use_mb == {1: 45000} and not report.clean
    assert "GPU 1: 45000 MiB" in " ".join(report.errors)
