"""Server CPU shares: interpolation, classification, the front-end verdict, and one real process tree."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from pytest_mm27.host.servercpu import (
    API, ENGINE, OTHER, FRONT_END_CORE_SHARE, ProcessCpu, ProcessSeries, ServerCpu, ServerCpuSampler, classify,
    front_end_bound, process_title, server_cpu,
)

TICKS = [float(t) for t in range(11)]          # one sampling round a second, t = 0..10


def steady(pid, ppid, cmdline, cores, ticks=TICKS, base=0.0):
    """A process using ``cores`` of a core the whole time it was seen."""
    return ProcessSeries(pid, ppid, cmdline, [(t, base + cores * (t - ticks[0])) for t in ticks])


def test_interpolates_linearly_between_the_samples_around_each_edge():
    # 1 s of CPU between t=2 and t=4, none elsewhere: the window [3, 9] holds half of it.
    proc = ProcessSeries(10, 1, "vllm serve m", [(0, 0.0), (2, 0.0), (4, 1.0), (10, 1.0)])
    assert proc.cpu_at(3.0) == pytest.approx(0.5)
    assert proc.cpu_at(4.0) == pytest.approx(1.0)
    share = server_cpu([proc], TICKS, 10, 3.0, 9.0)
    assert share.api_max_cores == pytest.approx(0.5 / 6)
    assert share.window_s == 6.0 and share.samples == 7       # rounds at t = 3..9


def test_processes_count_for_the_part_of_the_window_they_were_seen():
    root = steady(10, 1, "vllm serve m", 1.0)
    late = steady(11, 10, "VLLM::EngineCore", 0.5, ticks=TICKS[6:])     # born at t=6
    gone = steady(12, 10, "python -c resource_tracker", 1.0, ticks=TICKS[:3])   # gone after t=2
    share = server_cpu([root, late, gone], TICKS, 10, 0.0, 10.0)
    assert share.api_max_cores == pytest.approx(1.0)
    assert share.engine_cores == pytest.approx(0.5 * 4 / 10)
    assert share.other_cores == pytest.approx(2 / 10)
    # Windows past either end of a process's samples take its nearest sample: no extrapolation.
    assert server_cpu([gone], TICKS, 10, 5.0, 10.0).other_cores == 0.0


def test_one_api_server_is_the_root_even_with_engines_and_a_coordinator():
    series = [steady(10, 1, "/opt/vllm/bin/vllm serve m --api-key s3cret", 0.99),
              steady(11, 10, "VLLM::EngineCore_DP0", 0.49), steady(12, 10, "VLLM::EngineCore_DP1", 0.47),
              steady(13, 11, "VLLM::Worker_TP0", 0.2), steady(14, 11, "VLLM::Worker_TP1", 0.2),
              steady(15, 10, "VLLM::DPCoordinator", 0.05)]
    assert classify(series, 10) == [API, ENGINE, ENGINE, ENGINE, ENGINE, OTHER]
    share = server_cpu(series, TICKS, 10, 0.0, 10.0)
    assert [(p.pid, p.title) for p in share.api] == [(10, "vllm")]      # the program, never its arguments
    assert [p.title for p in share.engine] == ["EngineCore_DP0", "EngineCore_DP1", "Worker_TP0", "Worker_TP1"]
    assert share.engine_cores == pytest.approx(1.36)
    assert share.other_cores == pytest.approx(0.05)


def test_api_server_count_above_one_makes_the_root_a_supervisor():
    series = [steady(10, 1, "vllm serve m --api-server-count 2", 0.02),
              steady(11, 10, "VLLM::EngineCore", 0.5),
              steady(12, 10, "VLLM::APIServer_0", 0.6), steady(13, 10, "VLLM::APIServer_1", 0.95)]
    assert classify(series, 10) == [OTHER, ENGINE, API, API]
    share = server_cpu(series, TICKS, 10, 0.0, 10.0)
    assert [p.cores for p in share.api] == pytest.approx([0.6, 0.95])
    assert share.api_max_cores == pytest.approx(0.95)
    assert front_end_bound({"dp2": share}) == (
        True, "dp2: API server APIServer_1 at 0.95 of a core (engine 0.50 cores)")


def test_the_api_server_is_the_engines_spawner_under_a_wrapper():
    series = [steady(10, 1, "uv run vllm serve m", 0.0), steady(11, 10, "vllm serve m", 0.97),
              steady(12, 11, "VLLM::EngineCore", 0.5)]
    assert classify(series, 10) == [OTHER, API, ENGINE]


def test_the_simulator_is_one_process_and_its_own_api_server():
    series = [steady(10, 1, "python -m pytest_mm27.sim serve --port 8000", 0.3)]
    assert classify(series, 10) == [API]


def test_titles_follow_the_configured_prefix():
    assert process_title("VLLM::Worker_DP1_TP0") == "Worker_DP1_TP0"
    assert process_title("MYCO::EngineCore   ", prefix="MYCO") == "EngineCore"
    assert process_title("MYCO::EngineCore") is None
    series = [steady(10, 1, "vllm serve m", 0.9), steady(11, 10, "MYCO::EngineCore", 0.5)]
    assert server_cpu(series, TICKS, 10, 0, 10, prefix="MYCO").engine_cores == pytest.approx(0.5)


def cpu(api=0.99, engine=0.49, samples=40, window_s=10.0) -> ServerCpu:
    return ServerCpu(window_s, samples, (ProcessCpu(10, "vllm", api),), (ProcessCpu(11, "EngineCore", engine),), 0.0)


def test_front_end_bound_at_the_threshold_and_not_below():
    assert front_end_bound({"dp3-r0": cpu()}) == (True, "dp3-r0: API server at 0.99 of a core (engine 0.49 cores)")
    assert front_end_bound({"a": cpu(api=FRONT_END_CORE_SHARE)})[0]
    assert front_end_bound({"a": cpu(api=0.89)}) == (False, None)
    assert front_end_bound({"a": cpu(api=0.5)}, threshold=0.4)[0]
    bound, reason = front_end_bound({"r1": cpu(api=0.95), "r0": cpu(api=0.3), "r2": cpu(api=0.92)})
    assert bound and reason == ("r1: API server at 0.95 of a core (engine 0.49 cores); "
                                "r2: API server at 0.92 of a core (engine 0.49 cores)")


def test_short_windows_give_no_verdict_and_say_so():
    root = steady(10, 1, "vllm serve m", 1.0)
    short = server_cpu([root], TICKS, 10, 4.5, 6.5)          # two rounds inside
    assert short.samples == 2 and short.too_short
    assert short.api_max_cores == pytest.approx(1.0)          # measured all the same, only not judged
    assert front_end_bound({"r0": short}) == (False, None)
    assert not server_cpu([root], TICKS, 10, 4.5, 7.5).too_short
    assert server_cpu([root], TICKS, 10, 5.0, 5.0).api_max_cores == 0.0
    assert server_cpu([], [], 10, 0.0, 10.0).to_dict()["too_short"]


def test_to_dict_shape():
    assert cpu(api=0.99, engine=0.49).to_dict() == {
        "window_s": 10.0, "samples": 40, "too_short": False,
        "api_max_cores": 0.99, "engine_cores": 0.49, "other_cores": 0.0,
        "api": [{"pid": 10, "title": "vllm", "cores": 0.99}],
        "engine": [{"pid": 11, "title": "EngineCore", "cores": 0.49}],
    }


# The root busy-loops; it soon starts a sleeping child whose argv[0] is an
# engine title, the way setproctitle leaves vLLM's children's command lines.
# It lives well past one RESCAN_S after that: an orphan's parent no longer
# says whose it is, so the child must be found while the root is alive.
ROOT = """
import subprocess, sys, time
start = time.monotonic()
while time.monotonic() < start + 0.3:
    pass
child = subprocess.Popen(["MM27T::EngineCore", "-c", "import time; time.sleep(60)"],
                         executable=sys.executable, stdout=subprocess.DEVNULL)
print(child.pid, flush=True)
while time.monotonic() < start + 3.0:
    pass
"""


def test_real_tree_busy_root_and_idle_child_seen_and_classified():
    root = subprocess.Popen([sys.executable, "-c", ROOT], stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        with ServerCpuSampler({"r0": root.pid}, interval_s=0.1, title_prefix="MM27T") as sampler:
            start = time.time()
            child_pid = int(root.stdout.readline())
            root.wait(timeout=60)
            time.sleep(0.5)                 # sampled on with the root gone
            end = time.time()
        share = sampler.shares(start, end)["r0"]
    finally:
        root.kill()
        root.wait()
        root.stdout.close()
        if child_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
    assert not share.too_short
    assert [p.pid for p in share.api] == [root.pid] and share.api_max_cores > 0.05
    assert [(p.pid, p.title) for p in share.engine] == [(child_pid, "EngineCore")]
    assert share.engine_cores < 0.25
