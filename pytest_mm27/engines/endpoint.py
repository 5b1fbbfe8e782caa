"""The endpoint engine: servers someone else started, given by URL; nothing is booted.

It plans like the other engines (a plan with no server processes, only the
endpoints and the model to send), so the harness runs every engine through
the same sequence. ``prepare`` asks the first endpoint which model it
serves; ``version`` asks it which vLLM it is.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Sequence
from dataclasses import replace

from ..catalog.topology import Topology
from ..errors import ConfigError, LaunchError
from ..host.probe import get_json
from ..host.plan import LaunchPlan
from .base import DeviceKind, EngineOptions

# Longer than the launcher's health probes: a busy server may take a while to list its models.
PROBE_TIMEOUT_S = 10.0


def served_model(endpoint: str, wanted: str, api_key: str | None) -> str:
    """The model name to send: the topology's if served, else the only one served."""
    try:
        models = [m["id"] for m in get_json(f"{endpoint}/v1/models", api_key, PROBE_TIMEOUT_S)["data"]]
    except (OSError, urllib.error.URLError, ValueError, KeyError, TypeError) as exc:
        raise LaunchError(f"endpoint {endpoint} did not answer GET /v1/models: {exc}") from exc
    if wanted in models:
        return wanted
    if len(models) == 1:
        return models[0]
    raise ConfigError(f"endpoint {endpoint} serves {models}, not {wanted!r}; "
                      "set the topology's model.served_name", field="model.served_name")


class EndpointEngine:
    name = "endpoint"

    def available(self, options: EngineOptions, topology: Topology | None = None) -> tuple[bool, str]:
        if not options.endpoints:
            return False, "no --endpoint URL given"
        return True, f"endpoint ({', '.join(options.endpoints)}; nothing is booted)"

    def version(self, options: EngineOptions) -> str | None:
        """The server's ``/version`` (vLLM answers it), else None."""
        try:
            return str(get_json(f"{options.endpoints[0]}/version", options.api_key, PROBE_TIMEOUT_S).get("version"))
        except (OSError, urllib.error.URLError, ValueError, AttributeError, IndexError):
            return None

    def prepare(self, topology: Topology, options: EngineOptions) -> Topology:
        """The topology with the served model the endpoint answers with."""
        served = served_model(options.endpoints[0], topology.model.served_name, options.api_key)
        return replace(topology, model=replace(topology.model, served_name=served))

    def device_kind(self, topology: Topology) -> DeviceKind | None:
        return None

    def devices_needed(self, topology: Topology) -> int:
        return 0

    def known_error(self, topology: Topology, concurrency: int) -> float | None:
        return None

    def plan(self, topology: Topology, options: EngineOptions, ports: Sequence[int] = (),
             devices: Sequence[tuple[int, ...]] = ()) -> LaunchPlan:
        return LaunchPlan(topology=topology, engine=self.name, servers=(), endpoints=tuple(options.endpoints),
                          model=topology.model.served_name, startup_timeout_s=0.0)
