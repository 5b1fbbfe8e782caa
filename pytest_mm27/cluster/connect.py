"""Ray, imported on demand, and the driver's connection to a cluster.

``--ray-address`` takes what ``ray.init`` takes: ``auto`` (the cluster this
machine is part of), ``ray://host:10001`` (Ray Client) or a head's
``host:port``. The connection is shared by every launcher of the run and
closed when the last one stops, if this process opened it.
"""

from __future__ import annotations

import importlib.util
import threading
from types import ModuleType
from typing import Any

from ..errors import ConfigError, LaunchError

NAMESPACE = "pytest-mm27"
INSTALL_HINT = "pip install 'pytest-mm27[ray]'"

_lock = threading.Lock()
_users = 0
_opened_here = False


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def require_ray(field: str = "--ray-address") -> ModuleType:
    """The ray module, or a ConfigError saying how to install it."""
    if not ray_available():
        raise ConfigError(f"a Ray cluster was asked for, but Ray is not installed here ({INSTALL_HINT})",
                          field=field)
    import ray

    return ray


def connect(address: str) -> Any:
    """Join the cluster at ``address`` (once per process); returns the ray module."""
    global _users, _opened_here
    ray = require_ray()
    with _lock:
        if not ray.is_initialized():
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                         logging_level="WARNING", configure_logging=False)
            except Exception as exc:  # ConnectionError, ValueError, grpc errors: all mean "not reachable"
                raise LaunchError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
            _opened_here = True
        else:
            current = _current_address(ray)
            # Hosts have aliases (127.0.0.1, the node's IP); a different port is surely another cluster.
            if current and not address.startswith("ray://") and address != "auto" \
                    and address.rsplit(":", 1)[-1] != current.rsplit(":", 1)[-1]:
                raise LaunchError(f"this process is already connected to the Ray cluster at {current}, "
                                  f"not {address!r}; one process talks to one cluster")
        _users += 1
    return ray


def disconnect() -> None:
    """One user done; the last one closes a connection this process opened."""
    global _users, _opened_here
    with _lock:
        _users = max(0, _users - 1)
        if _users == 0 and _opened_here:
            import ray

            ray.shutdown()
            _opened_here = False


def _current_address(ray: Any) -> str | None:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return None
