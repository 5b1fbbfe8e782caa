"""Traffic sections of a workload: shared prefixes and multi-turn chat sessions.

    [prefix]            # K distinct prefixes of P tokens shared across requests
    count = 4           # K: system prompts, documents
    tokens = 256        # P: each request is P prefix tokens + its own input_tokens

    [sessions]          # multi-turn chat (api = "chat")
    turns = 4           # N turns per session; a turn's prompt is the whole history
    think_time_s = 0.5  # the user "thinks" this long between a reply and the next turn
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .datafile import Table
from .lengths import unit

# Hash streams of lengths.unit, one per thing drawn per request, so they are independent.
STREAM_INPUT, STREAM_OUTPUT, STREAM_PREFIX, STREAM_ROW = 1, 2, 3, 4


@dataclass(frozen=True)
class PrefixSpec:
    count: int
    tokens: int

    def which(self, seed: int, index: int) -> int:
        """The prefix request ``index`` starts with (seeded, evenly spread)."""
        return min(self.count - 1, int(unit(seed, STREAM_PREFIX, index) * self.count))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SessionSpec:
    turns: int
    think_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_prefix(t: Table) -> PrefixSpec | None:
    if not t.has("prefix"):
        return None
    p = t.table("prefix")
    spec = PrefixSpec(count=p.integer("count"), tokens=p.integer("tokens"))
    p.finish()
    return spec


def parse_sessions(t: Table) -> SessionSpec | None:
    if not t.has("sessions"):
        return None
    s = t.table("sessions")
    spec = SessionSpec(turns=s.integer("turns"), think_time_s=s.number("think_time_s", 0.0, minimum=0.0))
    s.finish()
    return spec
