"""A deployment: a topology on an engine, booted on first use by the harness that declared it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .catalog.topology import Topology
from .catalog.workload import Workload
from .engines import Engine
from .errors import ConfigError
from .host.launcher import Launcher
from .result import Result

if TYPE_CHECKING:
    from .cluster.launcher import RayLauncher
    from .harness import Harness


@dataclass
class EngineChoice:
    engine: Engine
    reason: str          # said in the first line of output

    @property
    def name(self) -> str:
        return self.engine.name


@dataclass
class LiveDeployment:
    deployment: Deployment
    launcher: Launcher | RayLauncher | None = None
    lease: Any = None
    endpoints: tuple[str, ...] = ()
    model: str = ""
    failure: str | None = None      # once set, every later level of this deployment errors with it
    gpus: tuple[int, ...] = ()      # leased GPUs, sampled for telemetry during each level


class Deployment:
    """A topology on an engine, booted on first use; :meth:`run` measures one level.

    ``name`` keys its records and baselines (the topology's name unless a
    test named the variant). Booting another deployment stops this one.
    """

    def __init__(self, harness: Harness, topology: Topology, choice: EngineChoice):
        self.harness = harness
        self.topology = topology
        self.choice = choice

    @property
    def name(self) -> str:
        return self.topology.name

    @property
    def engine(self) -> str:
        return self.choice.name

    @property
    def workload(self) -> Workload:
        """The workload a level runs when it names none: --workload, else the topology's own."""
        return self.harness.workload_named(self.harness.cfg.workload or self.topology.workload)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The servers' base URLs (booting the deployment first if it is not up)."""
        return self.harness.boot(self).endpoints

    @property
    def model(self) -> str:
        """The model name requests send."""
        return self.harness.boot(self).model

    def run(self, concurrency: int, workload: str | Workload | None = None, *, trials: int | None = None,
            case: str | None = None, **shape: Any) -> Result:
        """Measure and gate one level; returns it as recorded, with figures to assert on.

        ``workload``: a catalog name or a Workload (default: :attr:`workload`);
        ``shape``: fields of it to change for this level (``output_tokens=512``,
        which names a variant, see ``Workload.variant``); ``trials``: this
        level's trials (default ``--trials``); ``case``: the stable id a test
        gives its level, so its baseline pairs it with the same test's.
        """
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigError(f"concurrency must be a positive integer, not {concurrency!r}")
        chosen = workload if isinstance(workload, Workload) else \
            self.harness.workload_named(workload) if workload else self.workload
        chosen = chosen.variant(**shape)
        chosen.arrival.check_level(chosen.name, str(chosen.source))
        level = self.harness.measure_level(self, concurrency, chosen, trials=trials, case=case)
        return Result(level, self.name, chosen.name)

    def search_rate(self, workload: str | Workload | None = None, *, case: str | None = None,
                    **shape: Any) -> Result:
        """The highest open-loop rate meeting the workload's ``[slo.search]`` attainment target
        (``Result.metrics.max_good_rate``); each probe is recorded as a rate level of its own."""
        chosen = workload if isinstance(workload, Workload) else \
            self.harness.workload_named(workload) if workload else self.workload
        chosen = chosen.variant(**shape)
        level = self.harness.search_level(self, chosen, case=case)
        return Result(level, self.name, f"{chosen.name}[rate-search]")
