"""Ports on this host: one the OS picks for a server, and whether a pinned one is taken.

A picked port can be taken by someone else before the server binds it; the
launcher retries once on "address already in use" for ports it picked.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Container

from ..errors import LaunchError

__all__ = ["free_port", "pick_port", "port_in_use"]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` right now (the OS picks it)."""
    host = host.strip("[]")
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pick_port(host: str, avoid: Container[int]) -> int:
    """A free port on ``host`` other than those in ``avoid`` (picked for other servers, not bound yet)."""
    for _ in range(50):
        port = free_port(host)
        if port not in avoid:
            return port
    raise LaunchError(f"could not find a free port on {host}")


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not bind ``host:port`` (it is taken).

    Binds with SO_REUSEADDR as servers do, so a port in TIME_WAIT counts as free.
    """
    host = host.strip("[]")
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False
