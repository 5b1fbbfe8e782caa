"""What the launcher starts: a plan of server processes (argv, environment, port, devices).

Engines (``pytest_mm27.engines``) turn a topology into a :class:`LaunchPlan`;
the launcher starts it and cannot tell vLLM from the simulator. Secrets (the
API key, env variables that look like credentials) stay in the plan so the
servers get them, and are masked by every method that produces text for
logs or records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..catalog.topology import Topology
from ..secrets import redact_argv, redact_env


@dataclass(frozen=True, repr=False)
class ServerSpec:
    """One server process: how to start it and where it will listen."""

    name: str                       # e.g. "dp3-r0"; also names the log file
    argv: tuple[str, ...]
    env: Mapping[str, str]          # added on top of os.environ
    host: str
    port: int                       # 0: the launcher picks a free port at start
    gpus: tuple[int, ...]           # GPU indices (or CPU cores) this server owns
    base_url: str                   # "http://host:port"
    # Sent as a bearer token by the launcher's health probe; never printed.
    api_key: str | None = field(default=None, repr=False)
    # The launcher gives the server a TMPDIR of its own and deletes it (and the
    # /dev/shm segments named after vllm_dist_* folders in it) at teardown.
    private_tmp: bool = False
    # False for a headless DP rank (vLLM's --headless): it serves no HTTP and is
    # healthy while it runs; the head's endpoint is the deployment's.
    serves: bool = True

    def __repr__(self) -> str:
        # Reprs end up in tracebacks and pytest failure output: keep them redacted.
        return (f"ServerSpec(name={self.name!r}, argv={self.redacted_argv()!r}, env={self.redacted_env()!r}, "
                f"host={self.host!r}, port={self.port!r}, gpus={self.gpus!r}, base_url={self.base_url!r})")

    def redacted_argv(self) -> tuple[str, ...]:
        return redact_argv(self.argv)

    def redacted_env(self) -> dict[str, str]:
        return redact_env(self.env)

    def command_line(self) -> str:
        """The redacted command, quoted for a shell; for logs and errors."""
        import shlex

        return shlex.join(self.redacted_argv())

    def with_port(self, port: int) -> ServerSpec:
        """The same server on another port (``--port`` in argv and base_url)."""
        argv = list(self.argv)
        for i, arg in enumerate(argv):
            if arg == "--port" and i + 1 < len(argv):
                argv[i + 1] = str(port)
            elif arg.startswith("--port="):
                argv[i] = f"--port={port}"
        return replace(self, argv=tuple(argv), port=port, base_url=make_base_url(self.host, port))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": list(self.redacted_argv()),
            "env": self.redacted_env(),
            "host": self.host,
            "port": self.port,
            "gpus": list(self.gpus),
            "base_url": self.base_url,
            "private_tmp": self.private_tmp,
            "serves": self.serves,
        }


# In argv of a plan spread over cluster nodes: the head's address and DP RPC port,
# known once the head is placed; the Ray launcher writes them in before starting.
HEAD_ADDRESS = "{head-address}"
HEAD_RPC_PORT = "{head-rpc-port}"


@dataclass(frozen=True)
class LaunchPlan:
    """Every server a topology needs, and the endpoints clients should hit."""

    topology: Topology
    engine: str
    servers: tuple[ServerSpec, ...]
    endpoints: tuple[str, ...]      # one per replica; one for native DP
    model: str                      # served model name clients send
    startup_timeout_s: float

    def with_server(self, index: int, server: ServerSpec) -> LaunchPlan:
        """Replace one server (after a port change), keeping endpoints in step."""
        old = self.servers[index]
        servers = list(self.servers)
        servers[index] = server
        endpoints = list(self.endpoints)
        # Endpoints are one per server, in order; with several servers on port 0
        # (not yet picked) their URLs are equal, so match by position first.
        if index < len(endpoints) and endpoints[index] == old.base_url:
            endpoints[index] = server.base_url
        elif old.base_url in endpoints:
            endpoints[endpoints.index(old.base_url)] = server.base_url
        return replace(self, servers=tuple(servers), endpoints=tuple(endpoints))

    def with_startup_timeout(self, seconds: float) -> LaunchPlan:
        return replace(self, startup_timeout_s=float(seconds))

    def to_dict(self) -> dict[str, Any]:
        """Redacted; for the run record."""
        return {
            "topology": self.topology.name,
            "engine": self.engine,
            "model": self.model,
            "endpoints": list(self.endpoints),
            "startup_timeout_s": self.startup_timeout_s,
            "servers": [s.to_dict() for s in self.servers],
        }


def make_base_url(host: str, port: int) -> str:
    """The URL clients (and the health probe) use; wildcard binds map to loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"          # IPv6 literal
    return f"http://{host}:{port}"
