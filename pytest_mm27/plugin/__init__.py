"""pytest hooks and fixtures: options, parametrization, terminal summary.

Everything that measures lives in the pytest-free library (harness, loadgen,
launcher, sim); this module only adapts it to pytest.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from ..config import build_config
from ..engines import parse_engine
from ..errors import Mm27Error
from ..finish import RunSummary, finish_run
from ..gate.specs import parse_tolerances
from ..harness import Harness
from ..parsing import (
    SIM_FAULTS, parse_concurrency, parse_endpoint, parse_error_rate, parse_gate, parse_history,
    parse_non_negative_float, parse_rates,
    parse_positive_float, parse_positive_int, parse_precision, parse_ray_address, parse_sim_fault,
)
from .fixtures import (
    CURRENT_ITEM_KEY, HARNESS_KEY, DeploymentHandle, Level, LevelCase, mm27_case, mm27_deployment, mm27_harness,
    mm27_level, mm27_topology,
)
from .progress import progress_for

RUN_ID_INPUT = "mm27_run_id"

# (option name, ini type, help, argparse extras). The ini key is "mm27_" + name.
_OPTIONS: list[tuple[str, str | None, str, dict[str, Any]]] = [
    ("topology", "linelist", "topology to run (repeatable, comma-separated; 'all' for every one)",
     {"action": "append", "metavar": "NAME"}),
    ("engine", "string", "auto (vllm when found with enough GPUs, else the simulator), vllm, sim or endpoint",
     {"type": parse_engine, "metavar": "ENGINE"}),
    ("endpoint", "linelist", "URL of an already-running OpenAI-compatible server (repeatable)",
     {"action": "append", "type": parse_endpoint, "metavar": "URL"}),
    ("workload", "string", "workload name for every topology (default: each topology's own, usually default)",
     {"metavar": "NAME"}),
    ("concurrency", "string", "override the topology's concurrency levels, e.g. 1,4,8",
     {"type": parse_concurrency, "metavar": "LEVELS"}),
    ("rate", "string", "open-loop request rates as the levels instead of concurrencies, e.g. 2,5,10 "
     "(requests/s; Poisson unless the workload's [arrival] says otherwise; test ids like dp3-r10)",
     {"type": parse_rates, "metavar": "RATES"}),
    ("results_dir", "string", "where run records and logs go (default: results/)", {"metavar": "DIR"}),
    ("topology_dir", "linelist", "extra folder of topology TOML files (repeatable; shadows built-ins)",
     {"action": "append", "metavar": "DIR"}),
    ("workload_dir", "linelist", "extra folder of workload TOML files (repeatable)",
     {"action": "append", "metavar": "DIR"}),
    ("floors_dir", "linelist", "extra folder of floors/<hardware>.toml files (repeatable)",
     {"action": "append", "metavar": "DIR"}),
    ("vllm", "string", "command that runs vLLM's CLI (default: vllm on PATH; e.g. '/venv/bin/vllm' or "
     "'/venv/bin/python -m vllm.entrypoints.cli.main'); env MM27_VLLM", {"metavar": "CMD"}),
    ("api_key", "string", "API key passed to servers we boot and sent by the client; env MM27_API_KEY",
     {"metavar": "KEY"}),
    ("hardware", "string", "hardware profile of this box when it differs from the topologies' "
     "(picks floors, baselines and the simulator's GPU), e.g. h200", {"metavar": "PROFILE"}),
    ("host", "string", "address servers bind to (default 127.0.0.1)", {"metavar": "HOST"}),
    ("ray_address", "string", "boot the servers on this Ray cluster: 'auto', ray://HOST:10001 or a head's "
     "HOST:PORT (needs pytest-mm27[ray]; default: local processes)", {"type": parse_ray_address, "metavar": "ADDR"}),
    ("ray_load_workers", "string", "run each level's load as N Ray actors on N distinct nodes of the "
     "--ray-address cluster (count and duration workloads; default: local workers)",
     {"type": parse_positive_int, "metavar": "N"}),
    ("sim_fault", "linelist", f"simulator fault knob NAME=VALUE: {', '.join(SIM_FAULTS)} (repeatable)",
     {"action": "append", "type": parse_sim_fault, "metavar": "KNOB"}),
    ("max_error_rate", "string", "fraction of failed requests that fails a level (default 0)",
     {"type": parse_error_rate, "metavar": "RATE"}),
    ("workers", "string", "load generator processes per level (default: automatic)",
     {"type": parse_positive_int, "metavar": "N"}),
    ("level_timeout", "string", "seconds one level may take before in-flight requests are cancelled "
     "and counted as timed out (default: none; each request still has the workload's timeout)",
     {"type": parse_positive_float, "metavar": "S"}),
    ("startup_timeout", "string", "override the topologies' startup timeout, seconds",
     {"type": parse_positive_float, "metavar": "S"}),
    ("seed", "string", "seed for the simulator and prompts (default 0)", {"type": int, "metavar": "N"}),
    ("trials", "string", "measure each level N times; comparisons use the spread as noise "
     "(default 1; 3 with --save-baseline)", {"type": parse_positive_int, "metavar": "N"}),
    ("precision", "string", "steady levels end when output tok/s is known to this relative half-width "
     "(95% interval), e.g. 1% (default: the workload's, 1%)", {"type": parse_precision, "metavar": "PCT"}),
    ("max_window", "string", "steady levels' longest measured window, seconds (default: the workload's, 60)",
     {"type": parse_positive_float, "metavar": "S"}),
    ("baseline", "string", "compare with a stored baseline: 'auto' (by hardware, topology, workload) or a PATH",
     {"metavar": "auto|PATH"}),
    ("save_baseline", "string", "promote this run's records to baselines (optionally under NAME)",
     {"nargs": "?", "const": "true", "metavar": "NAME"}),
    ("force", "bool", "let --save-baseline replace an existing baseline", {"action": "store_true"}),
    ("regression_tolerance", "string", "per-metric tolerances, e.g. throughput=5%,ttft_p99=10%",
     {"type": parse_tolerances, "metavar": "SPEC"}),
    ("history", "string", "history database every run is appended to: a file (SQLite; default "
     "<results-dir>/history.sqlite), a postgresql:// URL (needs pytest-mm27[history-pg]) or 'off'",
     {"type": parse_history, "metavar": "PATH|URL"}),
    ("gate", "string", "extra session gate: 'history' fails when a series' newest change point over the "
     "history is a regression past its tolerance (beside --baseline)", {"type": parse_gate, "metavar": "history"}),
    ("report_md", "string", "write a Markdown report (also appended to $GITHUB_STEP_SUMMARY when set)",
     {"metavar": "PATH"}),
    ("plots_dir", "string", "write PNG plots (needs matplotlib)", {"metavar": "DIR"}),
    ("pytest_benchmark_json", "string", "also export levels in pytest-benchmark's JSON format "
     "(seconds per output token), for pytest-benchmark compare", {"metavar": "PATH"}),
    ("progress_every", "string", "seconds between live progress lines when output is not a terminal "
     "(CI logs; default 5); 0 turns live progress off (so does -q)",
     {"type": parse_non_negative_float, "metavar": "S"}),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mm27", "pytest-mm27: LLM-serving performance")
    for name, ini_type, help_text, extra in _OPTIONS:
        default = False if extra.get("action") == "store_true" else None
        group.addoption(f"--{name.replace('_', '-')}", dest=f"mm27_{name}", default=default, help=help_text.replace("%", "%%"), **extra)
        parser.addini(f"mm27_{name}", help_text, type=ini_type, default=None)


def _getter(config: pytest.Config):
    def get(name: str) -> Any:
        value = config.getoption(f"mm27_{name}")
        if value is not None and value is not False:
            # (name, value) pairs of --sim-fault arrive parsed; keep them as they are
            if name == "sim_fault":
                return [f"{k}={v}" for k, v in value]
            return value
        value = config.getini(f"mm27_{name}")
        return value if value not in (None, [], "") else None
    return get


def _mm27_wanted(config: pytest.Config) -> bool:
    """Only boot-related work is deferred; configuration is always validated."""
    return not (config.option.help or config.option.version)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mm27: a pytest-mm27 benchmark level (added automatically)")
    if not _mm27_wanted(config):
        return
    try:
        cfg = build_config(_getter(config), Path(config.rootpath))
        workerinput = getattr(config, "workerinput", {})
        run_id = workerinput.get(RUN_ID_INPUT)
        harness = Harness(cfg, Path(config.rootpath), run_id=run_id)
    except Mm27Error as exc:
        raise pytest.UsageError(f"pytest-mm27: {exc}") from None
    config.stash[HARNESS_KEY] = harness
    _interrupt_on_sigterm()
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(harness), "mm27-xdist")
        # `-n N` alone means --dist load, which would spread one topology's levels over
        # workers (booting it N times on the same GPUs); loadgroup keeps each on one worker.
        if getattr(config.option, "dist", None) == "load":
            config.option.dist = "loadgroup"


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (CI cancelling the job) like Ctrl-C: pytest then finishes the
    session, which tears the servers down and closes the run records."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def handler(signum: int, frame: Any) -> None:
        # Hand it to whatever SIGINT handler is current rather than raising here:
        # during a level that is asyncio.Runner's, which cancels the level's task
        # cleanly. A KeyboardInterrupt raised from this frame could land inside a
        # transport callback, where uvloop logs it as a fatal transport error and
        # swallows it (the run then went on as if never signalled).
        current = signal.getsignal(signal.SIGINT)
        if callable(current) and current is not signal.default_int_handler:
            current(signal.SIGINT, frame)
            return
        raise KeyboardInterrupt(f"received signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)


class _XdistHooks:
    """Registered only when pytest-xdist is present: one run id, one worker per topology."""

    def __init__(self, harness: Harness):
        self.harness = harness

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput[RUN_ID_INPUT] = self.harness.run_id

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """Each topology whole on one worker (see xdist_sched); other modes are the user's choice."""
        if config.getvalue("dist") != "loadgroup":
            return None
        from .xdist import TopologyScheduling
        return TopologyScheduling(config, log, [t.name for t in self.harness.topologies])


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    harness = config.stash.get(HARNESS_KEY, None)
    if harness is None:
        return None
    names = ", ".join(t.name for t in harness.topologies)
    workloads = ", ".join(dict.fromkeys(w.name for w in harness.workloads.values())) or "-"
    return [harness.engine_line(),
            f"mm27: topologies {names} · workload {workloads} · results {harness.run_dir}"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    harness = metafunc.config.stash.get(HARNESS_KEY, None)
    if harness is None:
        return
    if "mm27_level" in metafunc.fixturenames:
        cases = [LevelCase(t, c, r, s) for t in harness.topologies for c, r, s in harness.cases_for(t)]
        metafunc.parametrize("mm27_case", cases, ids=[c.id for c in cases])
    if "mm27_topology" in metafunc.fixturenames:
        # Session-scoped, so pytest groups the tests by topology and each boots once.
        names = [t.name for t in harness.topologies]
        metafunc.parametrize("mm27_topology", names, ids=names, indirect=True, scope="session")


def pytest_sessionstart(session: pytest.Session) -> None:
    harness = session.config.stash.get(HARNESS_KEY, None)
    if harness is not None:
        # The terminal reporter exists by now; the live line goes through it.
        harness.progress = progress_for(session.config, harness.cfg.progress_every_s)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Remember the running test: the levels it runs are named after it (``fixtures.case_id``)."""
    item.config.stash[CURRENT_ITEM_KEY] = item
    try:
        return (yield)
    finally:
        del item.config.stash[CURRENT_ITEM_KEY]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run each topology's levels together and in order, so it boots once."""
    harness = config.stash.get(HARNESS_KEY, None)
    if harness is None:
        return
    order = {t.name: i for i, t in enumerate(harness.topologies)}

    def case_of(item: pytest.Item) -> LevelCase | None:
        callspec = getattr(item, "callspec", None)
        return callspec.params.get("mm27_case") if callspec else None

    positions = [i for i, item in enumerate(items) if case_of(item)]
    bench = sorted((items[i] for i in positions),
                   key=lambda it: (order[case_of(it).topology.name], case_of(it).search,
                                   case_of(it).rate or 0, case_of(it).concurrency))
    for i, item in zip(positions, bench):
        items[i] = item
        item.add_marker(pytest.mark.mm27)


SUMMARY_KEY = pytest.StashKey[RunSummary]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    harness = config.stash.get(HARNESS_KEY, None)
    if harness is None:
        return
    close_error = None
    try:
        harness.close(interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)
    except Mm27Error as exc:        # servers are stopped; a record could not be written
        close_error = str(exc)
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if hasattr(config, "workerinput"):
        return      # the controller compares and reports, from the records on disk
    summary = finish_run(harness.cfg, harness.run_dir, harness.baselines)
    if close_error:
        summary.failures.append(close_error)
    config.stash[SUMMARY_KEY] = summary
    if summary.failed and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    summary = config.stash.get(SUMMARY_KEY, None)
    if summary is None or not (summary.lines or summary.failures):
        return
    terminalreporter.section("pytest-mm27")
    for line in summary.lines:
        terminalreporter.write_line(line)
    for failure in summary.failures:
        terminalreporter.write_line(f"FAILED: {failure}", red=True)


# The fixtures are the plugin's: pytest finds them as attributes of this module.
__all__ = ["DeploymentHandle", "Level", "LevelCase", "mm27_case", "mm27_deployment", "mm27_harness", "mm27_level",
           "mm27_topology"]
