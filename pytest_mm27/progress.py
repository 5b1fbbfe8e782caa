"""Who hears how a boot and a level are going: the plugin's live line, or nobody."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Told about once a second while a deployment boots and while a level runs; ``done`` after each."""

    def booting(self, name: str, elapsed: float, timeout: float, last_line: str) -> None: ...
    def measuring(self, name: str, concurrency: int, done: int, total: int | None, tok_s: float,
                  failed: int) -> None: ...
    def done(self) -> None: ...


class Silent:
    """The default: nobody listens."""

    def booting(self, name: str, elapsed: float, timeout: float, last_line: str) -> None:
        pass

    def measuring(self, name: str, concurrency: int, done: int, total: int | None, tok_s: float,
                  failed: int) -> None:
        pass

    def done(self) -> None:
        pass
