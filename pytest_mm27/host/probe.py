"""Small HTTP GETs to servers: the launcher's health wait, and asking a server what it serves.

Proxies are never honoured: the servers are ours or named by URL, and an
``http_proxy`` meant for the internet would send the probe of a local server
elsewhere. Timeouts are short, so a wait that probes a dead child notices
its death within about a second.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPResponse
from typing import Any

__all__ = ["PROBE_TIMEOUT_S", "Answer", "get", "get_json"]

PROBE_TIMEOUT_S = 1.0
MAX_BODY_BYTES = 1 << 20            # a model list, a health page: never more than this

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Answer:
    status: int | None              # None: no HTTP answer at all
    body: bytes                     # empty unless the status is 2xx
    why: str                        # "HTTP 503", "connection refused (not listening yet)", ...


def _open(url: str, api_key: str | None, timeout: float) -> HTTPResponse:
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    return _opener.open(request, timeout=timeout)  # noqa: S310 - a server's http(s) URL


def get(url: str, api_key: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> Answer:
    """GET ``url``; never raises: a failure is an :class:`Answer` that says why."""
    try:
        with _open(url, api_key, timeout) as resp:
            return Answer(resp.status, resp.read(MAX_BODY_BYTES), f"HTTP {resp.status}")
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, b"", f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            return Answer(None, b"", "connection refused (not listening yet)")
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return Answer(None, b"", f"no answer within {timeout:g} s")
        return Answer(None, b"", str(reason))


def get_json(url: str, api_key: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> Any:
    """The JSON body of a GET; raises OSError (urllib's errors included) or ValueError (not JSON)."""
    with _open(url, api_key, timeout) as resp:
        return json.loads(resp.read(MAX_BODY_BYTES))
