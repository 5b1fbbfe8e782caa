"""Servers never outlive the process that booted them: stop them when it exits.

Every launcher that has started servers is tracked here until it stops. An
``atexit`` hook stops the ones left when Python exits (a crashed script, an
uncaught exception), so no orphan keeps holding GPUs. A signal that kills
the process skips ``atexit``; :func:`install_signal_handlers` covers that for
scripts.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from collections.abc import Iterable
from typing import Any, Protocol


class Stoppable(Protocol):
    """What is tracked: a launcher, or anything else that must stop its servers."""

    def stop(self) -> Any: ...

__all__ = ["install_signal_handlers", "stop_all", "track", "untrack"]

_live: set[Stoppable] = set()
_live_lock = threading.Lock()
_handled_signals: set[int] = set()


def track(launcher: Stoppable) -> None:
    with _live_lock:
        _live.add(launcher)


def untrack(launcher: Stoppable) -> None:
    with _live_lock:
        _live.discard(launcher)


def stop_all() -> list[Any]:
    """Stop every launcher still running (the atexit hook and the signal handlers call this)."""
    with _live_lock:
        launchers = list(_live)
    return [launcher.stop() for launcher in launchers]


atexit.register(stop_all)


def install_signal_handlers(signals: Iterable[int] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """Stop all servers when this process is told to exit, then exit as asked.

    For scripts that drive a Launcher outside pytest (``vllm_crosscheck``):
    ``kill PID`` would otherwise end the script and leave its servers running.
    Call it once, from the main thread; a library should not take signals
    over on import. Earlier handlers still run afterwards. The pytest plugin
    does not use it: it turns SIGTERM into KeyboardInterrupt instead, so
    pytest finishes the session, whose teardown stops the servers and still
    writes the run records and the summary.
    """
    for sig in signals:
        if sig in _handled_signals:
            continue
        _handled_signals.add(sig)
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, _previous: Any = previous) -> None:
            stop_all()
            if callable(_previous):
                _previous(signum, frame)
            elif _previous != signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)
