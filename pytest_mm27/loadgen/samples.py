"""What one request did, and the plain arithmetic over requests (no I/O, no clocks).

Times in a :class:`RequestRecord` are seconds on one timeline shared by every
worker process of the level (see ``runner``); only differences are meaningful.
Definitions follow README.md's "Metrics" section (those of vLLM's benchmark
client).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Percentiles:
    """Summary of a sample in milliseconds. Empty samples give all-NaN-free zeros with n=0."""

    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    n: int = 0

    @classmethod
    def of(cls, values_ms: Iterable[float]) -> Percentiles:
        data = sorted(values_ms)
        if not data:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        return cls(
            mean=math.fsum(data) / len(data),
            p50=percentile(data, 50),
            p90=percentile(data, 90),
            p99=percentile(data, 99),
            min=data[0],
            max=data[-1],
            n=len(data),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Percentiles:
        return cls(**data)


def percentile(sorted_data: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as vLLM uses)."""
    if not sorted_data:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(sorted_data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_data) - 1)
    frac = pos - lo
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * frac


@dataclass(slots=True)
class RequestRecord:
    """What one measured request did. Times in seconds on the level's shared timeline."""

    index: int                  # order in which the request was claimed (0-based)
    endpoint: str
    worker: int
    slot_free: float            # when the slot that sent it became free (dispatch was due)
    sent: float                 # just before the HTTP request was issued
    end: float                  # when the client was done with it (success or failure)
    ok: bool = False
    error: str | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each text-bearing chunk
    output_tokens: int = 0      # usage.completion_tokens
    prompt_tokens: int = 0      # usage.prompt_tokens
    ramp: bool = False          # first request of its slot (sent at level start, not a refill)
    scheduled: float | None = None  # open loop: when the arrival schedule said it was due

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2el(self) -> float | None:
        return self.chunk_times[-1] - self.sent if self.chunk_times else None

    @property
    def client_queue(self) -> float | None:
        """Open loop: due -> allowed to go (the wait for the max-concurrency cap)."""
        return self.slot_free - self.scheduled if self.scheduled is not None else None

    @property
    def tpot(self) -> float | None:
        return tpot(self.sent, self.chunk_times, self.output_tokens)

    def itls(self) -> list[float]:
        return itls(self.chunk_times)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        return cls(**data)


def tpot(sent: float, chunk_times: Sequence[float], output_tokens: int) -> float | None:
    """(E2EL - TTFT) / (output_tokens - 1); None when it is undefined (< 2 tokens, or one chunk)."""
    if output_tokens < 2 or len(chunk_times) < 2:   # one chunk (a whole response) times no decoding
        return None
    return (chunk_times[-1] - chunk_times[0]) / (output_tokens - 1)


def itls(chunk_times: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip(chunk_times, chunk_times[1:])]


def steady_window(records: Sequence[RequestRecord], concurrency: int) -> tuple[float, float] | None:
    """The span during which all ``concurrency`` slots were busy.

    It opens when the c-th request is sent (ramp-up over) and closes at the
    first completion after the last send (from then on slots only drain).
    None when c requests were never in flight together.
    """
    if len(records) < concurrency or concurrency < 1:
        return None
    sends = sorted(r.sent for r in records)
    start = sends[concurrency - 1]
    last_send = sends[-1]
    after = [r.end for r in records if r.end > last_send and r.end > start]
    if not after:
        return None
    end = min(after)
    if end <= start:
        return None
    return start, end


def tokens_in_window(record: RequestRecord, start: float, end: float) -> float:
    """Tokens whose (estimated) arrival lies in [start, end].

    The server's completion_tokens is spread evenly over the text-bearing
    chunks, so a stream that packs several tokens per chunk is counted right.
    """
    if not record.chunk_times or record.output_tokens <= 0:
        return 0.0
    per_chunk = record.output_tokens / len(record.chunk_times)
    inside = sum(1 for t in record.chunk_times if start <= t <= end)
    return inside * per_chunk
