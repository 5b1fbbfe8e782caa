"""The fixtures tests use: deployments booted on first use, levels run and judged.

``mm27_deployment`` is a session-scoped factory (as pytest-postgresql's
``postgresql_proc``): ``mm27_deployment("dp3")`` declares a deployment,
checked at once and booted when a test first runs a level on it; the same
arguments give the same deployment, so tests share one boot. The harness
keeps one deployment up at a time and tears everything down at the end of
the session. ``mm27_topology`` is the deployment of each ``--topology``
(tests taking it are parametrized over them, grouped so each boots once);
``mm27_level`` is the canned suite's level, built on the same calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..catalog.topology import Topology
from ..catalog.workload import Workload
from ..deployment import Deployment
from ..errors import Mm27Error
from ..harness import Harness
from ..records.model import ERROR, FAIL, INVALID, Trial
from ..result import Result

HARNESS_KEY = pytest.StashKey[Harness]()
CURRENT_ITEM_KEY = pytest.StashKey[pytest.Item]()
_AUTO = "auto"


def case_id(item: pytest.Item) -> str:
    """A test's stable name for its levels: file, test and parameters (``test_slo.py::test_chat[dp3]``).

    The file's name without its folder, so a run from another directory or a
    moved ``suites/`` still pairs with the baseline's levels.
    """
    return f"{Path(item.nodeid.split('::', 1)[0]).name}::{item.name}"


class DeploymentHandle:
    """What ``mm27_deployment(...)`` and ``mm27_topology`` give a test.

    ``run(concurrency, ...)`` measures one level and returns a :class:`~pytest_mm27.result.Result`;
    ``arun`` is its awaitable twin for ``async def`` tests. ``endpoints`` and
    ``model`` boot the deployment if it is not up yet.
    """

    def __init__(self, deployment: Deployment, config: pytest.Config):
        self._deployment = deployment
        self._config = config
        self._cases: dict[tuple[str, str, int], int] = {}

    @property
    def name(self) -> str:
        return self._deployment.name

    @property
    def topology(self) -> Topology:
        return self._deployment.topology

    @property
    def engine(self) -> str:
        """``vllm``, ``sim`` or ``endpoint``."""
        return self._deployment.engine

    @property
    def workload(self) -> Workload:
        """The workload a level runs when it names none."""
        return self._deployment.workload

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._deployment.endpoints

    @property
    def model(self) -> str:
        return self._deployment.model

    @property
    def levels(self) -> tuple[int, ...]:
        """The concurrency levels of the topology (or of --concurrency)."""
        return self._deployment.harness.levels_for(self.topology)

    def run(self, concurrency: int, workload: str | Workload | None = None, *, trials: int | None = None,
            check: bool = True, case: str | None = _AUTO, **shape: Any) -> Result:
        """Measure one level, gate it (errors, floors and ceilings, the baseline) and record it.

        ``workload``: a catalog name or a Workload; ``shape``: fields to change
        for this level (``output_tokens=512``); ``trials``: default --trials.
        With ``check`` (the default) a level that could not be measured or
        failed its gate fails the test, and one whose numbers say more about
        the client than the server (client- or front-end-bound) skips it;
        ``check=False`` returns every result for the test to judge. ``case``
        names the level in records and baselines (default: from the test).
        """
        if case == _AUTO:
            case = self._case(concurrency, workload, shape)
        try:
            result = self._deployment.run(concurrency, workload, trials=trials, case=case, **shape)
        except Mm27Error as exc:      # bad arguments, or a record that cannot be written
            raise pytest.fail.Exception(f"could not measure: {exc}", pytrace=False) from None
        if check:
            _judge(result)
        return result

    async def arun(self, concurrency: int, workload: str | Workload | None = None, *, trials: int | None = None,
                   check: bool = True, case: str | None = _AUTO, **shape: Any) -> Result:
        """:meth:`run` for ``async def`` tests; the level runs in a thread, so the test's loop stays free."""
        if case == _AUTO:
            case = self._case(concurrency, workload, shape)
        return await asyncio.to_thread(self.run, concurrency, workload, trials=trials, check=check, case=case,
                                       **shape)

    def search_rate(self, workload: str | Workload | None = None, *, check: bool = True, case: str | None = _AUTO,
                    **shape: Any) -> Result:
        """Search for the highest rate meeting the workload's SLO attainment target ([slo.search]);
        ``result.metrics.max_good_rate`` is the answer, gated like any level (floors, baseline)."""
        if case == _AUTO:
            case = self._case(0, workload, {**shape, "search": True})
        try:
            result = self._deployment.search_rate(workload, case=case, **shape)
        except Mm27Error as exc:
            raise pytest.fail.Exception(f"could not measure: {exc}", pytrace=False) from None
        if check:
            _judge(result)
        return result

    def _case(self, concurrency: int, workload: str | Workload | None, shape: Mapping[str, Any]) -> str | None:
        item = self._config.stash.get(CURRENT_ITEM_KEY, None)
        if item is None:
            return None
        case = case_id(item)
        # A test that runs the same level twice gets "#2": both are kept.
        name = workload.name if isinstance(workload, Workload) else workload or ""
        key = (case, f"{name}{sorted(shape.items())}", concurrency)
        self._cases[key] = self._cases.get(key, 0) + 1
        return case if self._cases[key] == 1 else f"{case}#{self._cases[key]}"

    def __repr__(self) -> str:
        return f"<mm27 deployment {self.name} on {self.engine}>"


def _judge(result: Result) -> None:
    verdict = result.verdict
    if verdict.status == ERROR:
        pytest.fail("could not measure: " + verdict.message, pytrace=False)
    if verdict.status == INVALID:
        pytest.skip("inconclusive: " + verdict.message.replace("\n", "; "))
    if verdict.status == FAIL:
        pytest.fail(verdict.message, pytrace=False)


def _harness(config: pytest.Config) -> Harness:
    harness = config.stash.get(HARNESS_KEY, None)
    if harness is None:
        raise pytest.UsageError("pytest-mm27 is not configured in this session")
    return harness


_HANDLES = pytest.StashKey[dict[str, DeploymentHandle]]()


def handle_of(config: pytest.Config, deployment: Deployment) -> DeploymentHandle:
    """One handle per deployment, so a test's repeated levels are numbered across fixtures."""
    handles = config.stash.setdefault(_HANDLES, {})
    if deployment.name not in handles:
        handles[deployment.name] = DeploymentHandle(deployment, config)
    return handles[deployment.name]


DeploymentFactory = Callable[..., DeploymentHandle]


@pytest.fixture(scope="session")
def mm27_harness(pytestconfig: pytest.Config) -> Harness:
    """The session's harness (configuration, catalog, records); most tests want ``mm27_deployment``."""
    return _harness(pytestconfig)


@pytest.fixture(scope="session")
def mm27_deployment(pytestconfig: pytest.Config) -> DeploymentFactory:
    """``mm27_deployment(topology, *, name=None, engine=None, serve_args=(), env=None, hardware=None,
    workload=None)`` -> DeploymentHandle.

    ``topology``: a catalog name or a Topology. Overrides make a variant:
    extra vLLM ``serve_args`` and ``env``, another ``engine`` (auto, vllm,
    sim, endpoint), ``hardware`` profile or default ``workload``; give a
    variant its own ``name`` so its records and baselines stay apart.
    """
    harness = _harness(pytestconfig)

    def declare(topology: str | Topology, *, name: str | None = None, engine: str | None = None,
                serve_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                hardware: str | None = None, workload: str | None = None) -> DeploymentHandle:
        try:
            deployment = harness.declare(topology, name=name, engine=engine, serve_args=serve_args, env=env,
                                         hardware=hardware, workload=workload)
        except Mm27Error as exc:      # an unknown topology, a bad override: the test's setup errors
            raise pytest.UsageError(f"pytest-mm27: {exc}") from None
        return handle_of(pytestconfig, deployment)

    return declare


@pytest.fixture(scope="session")
def mm27_topology(request: pytest.FixtureRequest) -> DeploymentHandle:
    """The deployment of one ``--topology`` (tests taking this fixture run once per topology)."""
    harness = _harness(request.config)
    return handle_of(request.config, harness.deployments[request.param])


# ---- the canned suite (suites/test_throughput.py) --------------------------------------------

@dataclass(frozen=True)
class LevelCase:
    topology: Topology
    concurrency: int            # an open-loop level's in-flight cap
    rate: float | None = None   # an open-loop level's offered rate, requests/s
    search: bool = False        # the rate search of the workload's [slo.search]

    @property
    def id(self) -> str:
        if self.search:
            return f"{self.topology.name}-rate-search"
        if self.rate is not None:
            return f"{self.topology.name}-r{self.rate:g}"
        return f"{self.topology.name}-c{self.concurrency}"


@pytest.fixture
def mm27_case(request: pytest.FixtureRequest) -> LevelCase:
    return request.param


class Level:
    """What the suite's test gets: one (topology, concurrency) of the sweep to measure and judge."""

    def __init__(self, harness: Harness, handle: DeploymentHandle, case: LevelCase):
        self.topology = case.topology
        self.concurrency = case.concurrency
        self.rate = case.rate
        self.search = case.search
        self._shape = harness.rate_shape(handle.workload, case.rate)
        self.workload = handle.workload.variant(**self._shape)
        self.floor = harness.floor_value(case.topology, case.concurrency, self.workload.name
                                         + ("[rate-search]" if case.search else ""))
        self._handle = handle
        self.result: Result | None = None

    @property
    def entry(self) -> dict[str, Any] | None:
        """The level as recorded (JSON form)."""
        return self.result.level.to_dict() if self.result else None

    def measure(self) -> Trial | None:
        """Measure the level (booting the topology on first use) and judge it.

        Fails the test when errors pass the limit, throughput is below the
        floor, a ceiling is passed or the baseline says it regressed; skips a
        client-bound level (not gated); errors when the server could not be
        booted or died.
        """
        if self.search:
            self.result = self._handle.search_rate(case=None, check=False)
        else:
            self.result = self._handle.run(self.concurrency, case=None, check=False, **self._shape)
        _judge(self.result)
        return self.result.level.metrics


@pytest.fixture
def mm27_level(request: pytest.FixtureRequest, mm27_case: LevelCase) -> Level:
    harness = _harness(request.config)
    handle = handle_of(request.config, harness.deployments[mm27_case.topology.name])
    return Level(harness, handle, mm27_case)
