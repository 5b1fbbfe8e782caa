"""Errors the harness raises. Each says what went wrong and where."""

from __future__ import annotations


class Mm27Error(Exception):
    """Base class for every error the harness raises on purpose."""


class ConfigError(Mm27Error):
    """Bad input: a data file, an option value, an unknown name.

    Raised before anything boots. ``source`` names the file (or option) and
    ``field`` the key inside it, so the message can point at the mistake.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        where = ""
        if source and field:
            where = f"{source}: field '{field}': "
        elif source:
            where = f"{source}: "
        elif field:
            where = f"field '{field}': "
        super().__init__(where + message)


class LaunchError(Mm27Error):
    """A server could not be started, never became healthy, or died."""


class LoadError(Mm27Error):
    """The load generator could not complete a level."""


class PlacementUnsatisfiable(LaunchError):
    """A topology's placement cannot fit the Ray cluster; raised before anything boots."""


class NodeLost(LaunchError):
    """A cluster node (its raylet, and the servers on it) went away while the topology ran."""

    def __init__(self, message: str, *, node: str, servers: tuple[str, ...] = ()):
        self.node = node
        self.servers = servers
        super().__init__(message)
