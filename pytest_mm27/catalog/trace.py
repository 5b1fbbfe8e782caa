"""Request traces for replay: one JSON object per line.

    {"timestamp": 0.000, "input_tokens": 512, "output_tokens": 128}
    {"timestamp": 0.250, "input_tokens": 96, "output_tokens": 300, "prefix_id": "sys-1", "session_id": "u42"}

- ``timestamp``: seconds (a number, not decreasing from line to line); the
  replay sends each request at ``(timestamp - first timestamp) * time_scale``
  after the level's start.
- ``input_tokens``, ``output_tokens``: positive integers; the prompt is made
  to that length, ``max_tokens`` is the output length.
- ``prefix_id``, ``session_id``: optional strings, kept with each request's
  sample so results can be grouped by them.

Blank lines and lines starting with ``#`` are skipped. A malformed line is a
``ConfigError`` naming the file and line, raised when the workload loads,
before anything boots. ``fixtures/traces/example.jsonl`` is an example.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

_KEYS = ("timestamp", "input_tokens", "output_tokens", "prefix_id", "session_id")


@dataclass(frozen=True)
class TraceRow:
    timestamp: float
    input_tokens: int
    output_tokens: int
    prefix_id: str | None = None
    session_id: str | None = None


def _positive_int(row: dict, key: str, where: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}", source=where)
    return value


def parse_trace(path: Path) -> tuple[TraceRow, ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read trace: {exc.strerror or exc}", source=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc}", source=str(path)) from exc
    rows: list[TraceRow] = []
    last = -math.inf
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc.msg} (column {exc.colno})", source=where) from None
        if not isinstance(row, dict):
            raise ConfigError(f"must be a JSON object, got {type(row).__name__}", source=where)
        unknown = sorted(set(row) - set(_KEYS))
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})", source=where)
        ts = row.get("timestamp")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise ConfigError(f"timestamp must be a number of seconds, got {ts!r}", source=where)
        if ts < last:
            raise ConfigError(f"timestamp {ts:g} is before the previous line's {last:g} (sort the trace)",
                              source=where)
        last = float(ts)
        ids = {}
        for key in ("prefix_id", "session_id"):
            value = row.get(key)
            if value is not None and not (isinstance(value, str) and value):
                raise ConfigError(f"{key} must be a non-empty string, got {value!r}", source=where)
            ids[key] = value
        rows.append(TraceRow(float(ts), _positive_int(row, "input_tokens", where),
                             _positive_int(row, "output_tokens", where), **ids))
    if not rows:
        raise ConfigError("the trace has no requests", source=str(path))
    return tuple(rows)


_CACHE: dict[tuple[str, float, int], tuple[TraceRow, ...]] = {}


def load_trace(path: Path) -> tuple[TraceRow, ...]:
    """``parse_trace``, read once per file version (the workload loads it to check, the level to replay)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read trace: {exc.strerror or exc}", source=str(path)) from exc
    key = (str(path.resolve()), st.st_mtime, st.st_size)
    if key not in _CACHE:
        _CACHE[key] = parse_trace(path)
    return _CACHE[key]
