"""Users' own performance tests: the fixtures, the results, SLOs, endpoint runs and live progress.

Each test runs pytest in a subprocess (pytester) with a user's conftest.py
and test file on the simulator, as a serving team would write them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from pytest_mm27.testing import sim_topology

REPO = Path(__file__).resolve().parents[1]

CONFTEST = textwrap.dedent("""
    import pytest

    @pytest.fixture(scope="session")
    def tiny(mm27_deployment):
        return mm27_deployment("tiny")
""")


def setup(pytester: pytest.Pytester, tests: str, *, conftest: str = CONFTEST, floors: str = "") -> None:
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_user=textwrap.dedent(tests))
    (pytester.path / "topologies").mkdir(exist_ok=True)
    (pytester.path / "topologies" / "tiny.toml").write_text(sim_topology("tiny", [1, 4], dp=2))
    (pytester.path / "floors").mkdir(exist_ok=True)
    (pytester.path / "floors" / "rtx-pro-6000.toml").write_text(textwrap.dedent(floors))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "--topology-dir", "topologies", "--floors-dir", "floors", "--workload", "quick", "--topology", "tiny",
        "--engine", "sim", "--results-dir", "results", *args, timeout=240)


def records(pytester: pytest.Pytester) -> list[tuple[str, dict]]:
    """(file name, record) of every run's records, oldest run first (run ids sort by time)."""
    return [(p.name, json.loads(p.read_text())) for p in sorted(pytester.path.glob("results/runs/*/*.json"))]


def test_two_tests_share_one_boot_and_their_levels_are_recorded(no_leftovers):
    pytester = no_leftovers
    setup(pytester, """
        def test_single_stream(tiny):
            result = tiny.run(1)
            assert result.output_tok_s > 0 and result.ttft.p99 >= result.ttft.p50 > 0
            assert result.case == "test_user.py::test_single_stream" and result.passed

        def test_four_streams(tiny):
            assert tiny.engine == "sim" and tiny.topology.name == "tiny" and len(tiny.endpoints) == 2
            result = tiny.run(4, trials=2)
            assert len(result.trials) == 2 and result.tpot.p50 > 0 and result.error_rate == 0
    """)
    result = run(pytester, "--report-md", "report.md", "--plots-dir", "plots", "--pytest-benchmark-json", "bench.json")
    result.assert_outcomes(passed=2)
    logs = sorted(p.name for p in pytester.path.glob("results/runs/*/logs/*.log"))
    assert logs == ["tiny-r0.log", "tiny-r1.log"]        # two servers (DP=2), booted once (a reboot adds .2.log)
    [(_, record)] = records(pytester)
    assert [(lv["concurrency"], lv["case"]) for lv in record["levels"]] == [
        (1, "test_user.py::test_single_stream"), (4, "test_user.py::test_four_streams")]
    assert record["status"] == "complete"
    # The user's levels are in the terminal table, with the case they belong to.
    result.stdout.fnmatch_lines(["*case*conc*output tok/s*", "*test_single_stream   *1 *pass", "*test_four_streams   *4 *pass"])
    # ... and in the Markdown report, the pytest-benchmark export and the plots.
    report = (pytester.path / "report.md").read_text()
    assert "1 (test_user.py::test_single_stream)" in report and "4 (test_user.py::test_four_streams)" in report
    exported = json.loads((pytester.path / "bench.json").read_text())["benchmarks"]
    assert [b["name"] for b in exported] == ["mm27[tiny-c1-test_user.py::test_single_stream]",
                                             "mm27[tiny-c4-test_user.py::test_four_streams]"]
    assert sorted(p.name for p in (pytester.path / "plots").glob("*.png")) == [
        "tiny-throughput.png", "tiny-ttft-vs-throughput.png"]


def test_slo_miss_fails_with_metric_limit_measured_and_source(no_leftovers):
    pytester = no_leftovers
    setup(pytester, """
        def test_interactive(tiny):
            tiny.run(4).check(ttft_p99=0.001, error_rate=0.0, source="team SLO")

        def test_unknown_metric(tiny):
            tiny.run(1).check(ttft_p42=1)
    """)
    result = run(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*SloMiss: tiny · quick · test_user.py::test_interactive: ttft_p99 * ms is above its ceiling 0.0 ms "
        "(*% over) at c=4; ceiling: 0.0 ms (team SLO)*",
        "*ValueError: unknown SLO metric 'ttft_p42'; known: *ttft_p99*",
    ])
    result.stdout.no_fnmatch_line("*error_rate*above*")      # the limit that held is not reported


def test_floor_and_ceiling_from_the_floors_file(no_leftovers):
    pytester = no_leftovers
    floors = """
        [[floor]]
        topology = "tiny"
        workload = "quick"
        concurrency = 1
        tok_s = 1.0
        note = "a floor any run reaches"

        [[ceiling]]
        topology = "tiny"
        workload = "quick"
        concurrency = 4
        metric = "tpot_p50"
        max = 0.01
        note = "a ceiling no run meets"
    """
    setup(pytester, """
        def test_floor_holds(tiny):
            result = tiny.run(1)
            assert result.level.floor.tok_s == 1.0 and result.passed

        def test_ceiling_missed(tiny):
            tiny.run(4)
    """, floors=floors)
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*tpot_p50 * ms is above its ceiling 0.0 ms (*% over) at c=4; "
                                 "ceiling: 0.0 ms (a ceiling no run meets; rtx-pro-6000.toml)*"])


def test_user_levels_are_compared_with_the_baseline(no_leftovers):
    pytester = no_leftovers
    setup(pytester, """
        import pytest

        @pytest.mark.parametrize("concurrency", [1, 4])
        def test_level(tiny, concurrency):
            tiny.run(concurrency)
    """)
    saved = run(pytester, "--save-baseline", "--trials", "2")
    saved.assert_outcomes(passed=2)
    [baseline] = pytester.path.glob("results/baselines/sim-rtx-pro-6000/tiny--quick.json")
    cases = [lv["case"] for lv in json.loads(baseline.read_text())["levels"]]
    assert cases == ["test_user.py::test_level[1]", "test_user.py::test_level[4]"]
    for _ in range(3):      # the simulator runs on the wall clock: a loaded box can disturb one session
        compared = run(pytester, "--baseline", "auto")
        if compared.ret == 0:
            break
    compared.assert_outcomes(passed=2)
    compared.stdout.fnmatch_lines(["*vs baseline *tiny--quick.json*", "*test_level?1?*", "*test_level?4?*"])
    # The comparison pairs each level with the same test's level in the baseline.
    _, record = records(pytester)[-1]
    assert record["baseline"]["path"].endswith("tiny--quick.json")
    assert {lv["case"]: lv["comparison"]["case"] for lv in record["levels"]} == {c: c for c in cases}


def test_mm27_topology_fixture_and_async_twin(no_leftovers):
    pytester = no_leftovers
    setup(pytester, """
        import asyncio
        import pytest

        def test_any_topology(mm27_topology):
            assert mm27_topology.name == "tiny"
            assert mm27_topology.run(mm27_topology.levels[-1]).concurrency == 4

        @pytest.mark.asyncio(loop_scope="session")
        async def test_async(mm27_topology):
            # The level runs in a thread: the session's loop keeps serving other tasks meanwhile.
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            result = await mm27_topology.arun(1, output_tokens=8)
            ticker.cancel()
            assert result.workload == "quick[output_tokens=8]" and result.metrics.output_tokens > 0
            assert ticks > 5
    """, conftest="")
    result = run(pytester, "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_any_topology?tiny? PASSED*", "*test_async?tiny? PASSED*"])
    names = sorted(name for name, _ in records(pytester))
    assert names == ["tiny--quick_output_tokens=8_.json", "tiny.json"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sim_endpoint(tmp_path):
    """A simulator server started by hand, serving the model "org/served-model"."""
    port = _free_port()
    argv = [sys.executable, "-m", "pytest_mm27.sim", "serve", "--port", str(port),
            "--served-model-name", "org/served-model", "--hardware", "rtx-pro-6000",
            "--model", "minimax-m2.7-nvfp4", "--tensor-parallel-size", "2", "--max-model-len", "4096"]
    with (tmp_path / "sim.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "sim.log").read_text()
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_endpoint_alone_is_one_deployment_named_for_its_model(no_leftovers, sim_endpoint):
    pytester = no_leftovers
    pytester.makepyfile(test_throughput=(REPO / "suites" / "test_throughput.py").read_text())
    result = pytester.runpytest_subprocess("--endpoint", sim_endpoint, "--workload", "quick", "--concurrency", "1,2",
                                           "--results-dir", "results", "--hardware", "h200", "-v", timeout=240)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*topologies served-model *", "*test_throughput?served-model-c1?*"])
    [(name, record)] = records(pytester)
    assert name == "served-model.json"
    assert record["topology"]["name"] == "served-model" and record["hardware"]["profile"] == "h200"
    assert record["topology"]["model"]["name"] == "org/served-model"
    assert record["engine"]["name"] == "endpoint" and record["launch"] is None


def test_endpoint_with_a_topology_name_is_labelled_by_it(no_leftovers, sim_endpoint):
    pytester = no_leftovers
    pytester.makepyfile(test_throughput=(REPO / "suites" / "test_throughput.py").read_text())
    refused = pytester.runpytest_subprocess("--endpoint", sim_endpoint, "--topology", "all", timeout=120)
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines(["*an endpoint is one deployment: give one --topology NAME*"])
    result = pytester.runpytest_subprocess("--endpoint", sim_endpoint, "--topology", "dp3", "--workload", "quick",
                                           "--concurrency", "1", "--results-dir", "results", timeout=240)
    result.assert_outcomes(passed=1)
    assert [name for name, _ in records(pytester)] == ["dp3.json"]


SLOW_LEVEL = """
    def test_slow(tiny):
        tiny.run(4)
"""


def test_progress_lines_on_a_non_terminal_and_none_with_q(no_leftovers):
    pytester = no_leftovers
    setup(pytester, SLOW_LEVEL)
    # A non-terminal (pytester's pipe): plain lines, here every 0.5 s.
    result = run(pytester, "--progress-every", "0.5", "--workload", "default", "--concurrency", "4", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["mm27: tiny c=4 · * requests · * output tok/s*"])
    assert "\x1b7" not in result.stdout.str()          # no cursor games outside a terminal
    quiet = run(pytester, "--progress-every", "0.5", "--workload", "default", "--concurrency", "4", "-q")
    quiet.assert_outcomes(passed=1)
    assert "mm27: tiny c=4 ·" not in quiet.stdout.str()
    assert "mm27: booting" not in quiet.stdout.str()
