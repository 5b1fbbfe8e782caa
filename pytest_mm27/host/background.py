"""A call run in a daemon thread while the caller does something else."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Background:
    """A call run in a daemon thread; ``result()`` waits for it (and re-raises what it raised)."""

    def __init__(self, fn: Callable[[], Any]):
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="mm27-background", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
