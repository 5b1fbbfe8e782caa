"""The live line: how a boot and a level are going, through pytest's terminal reporter.

On a terminal the line is drawn after whatever pytest has written on the
current line (the test file's dots, or a test's name with -v) and redrawn
in place about once a second, then erased when the boot or level ends. On a
non-terminal (CI logs) a plain line is written every ``every`` seconds
instead, so a 30-minute boot still shows a sign of life. ``-q`` and xdist
workers (their output is not shown) stay silent.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from ..progress import Progress, Silent

# ANSI: save the cursor, restore it, erase to the end of the line.
_SAVE, _RESTORE, _ERASE = "\x1b7", "\x1b8", "\x1b[K"
_MIN_ROOM = 24          # columns left on the line below which the terminal line is not drawn


class TerminalProgress:
    _room = 0

    def __init__(self, reporter: Any, capture: Any, *, tty: bool, every: float):
        self._reporter = reporter
        self._capture = capture          # pytest's capture manager: suspended while a line is written
        self._tty = tty
        self._every = every
        self._lock = threading.Lock()
        self._drawn = False              # a terminal line is on screen
        self._started: float | None = None
        self._last = 0.0

    # ---- Progress ------------------------------------------------------------------------
    def booting(self, name: str, elapsed: float, timeout: float, last_line: str) -> None:
        text = f"mm27: booting {name} · {elapsed:.0f}s of {timeout:.0f}s"
        self._show(f"{text} · {last_line.strip()}" if last_line.strip() else text)

    def measuring(self, name: str, concurrency: int, done: int, total: int | None, tok_s: float,
                  failed: int) -> None:
        count = f"{done:,}/{total:,}" if total else f"{done:,}"
        errors = f" · {failed:,} failed" if failed else ""
        self._show(f"mm27: {name} c={concurrency} · {count} requests · {tok_s:,.0f} output tok/s{errors}")

    def done(self) -> None:
        with self._lock:
            self._started = None
            if self._drawn:
                with self._uncaptured():
                    self._raw(_RESTORE + _ERASE)
                self._drawn = False

    # ---- drawing -------------------------------------------------------------------------
    def _show(self, text: str) -> None:
        with self._lock:
            now = time.monotonic()
            if self._started is None:
                self._started, self._last = now, now
            if self._tty:
                self._draw(text)
            elif now - self._last >= self._every:
                self._last = now
                with self._uncaptured():
                    self._reporter.ensure_newline()
                    self._reporter.write_line(text)

    def _draw(self, text: str) -> None:
        writer = self._reporter._tw
        with self._uncaptured():
            if not self._drawn:
                room = writer.fullwidth - writer.width_of_current_line - 3
                if room < _MIN_ROOM:
                    return
                self._room = room
                self._raw(_SAVE)
                self._drawn = True
            line = text if len(text) <= self._room else text[: self._room - 1] + "…"
            self._raw(f"{_RESTORE}{_ERASE}  {line}")

    def _raw(self, text: str) -> None:
        # Past the terminal writer, so its column count stays that of pytest's own line.
        file = self._reporter._tw._file
        file.write(text)
        file.flush()

    def _uncaptured(self) -> AbstractContextManager[Any]:
        if self._capture is None:
            return nullcontext()
        return self._capture.global_and_fixture_disabled()


def progress_for(config: Any, every: float) -> Progress:
    """The session's live line, or silence (-q, xdist workers, no terminal reporter, ``every`` 0)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or every <= 0 or config.get_verbosity() < 0 or hasattr(config, "workerinput"):
        return Silent()
    tty = bool(getattr(reporter, "isatty", False)) and getattr(reporter._tw, "hasmarkup", False)
    return TerminalProgress(reporter, config.pluginmanager.get_plugin("capturemanager"), tty=tty, every=every)
