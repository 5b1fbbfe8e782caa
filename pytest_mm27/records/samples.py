"""Per-request samples beside a run record: one JSON Lines file per trial.

``<results>/<run>/<record stem>.samples/<level>-t<N>.jsonl`` (``.jsonl.gz``
once the text passes ``GZIP_FROM`` bytes). The first line is a header
(schema, level, trial, the wall-clock time of the timeline's zero); then one
line per request with its times in seconds on the level's timeline, written
as Python's ``repr`` of the floats (JSON round-trips them exactly), so the
percentiles recomputed from a file are the recorded ones bit for bit, and
trials can be merged by concatenating their requests. ``measured`` says
whether a request counts in the level's figures (a steady level's warm-up
and tail do not). The trial's ``samples`` field names its file, relative to
the record's folder.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Mm27Error
from ..loadgen.samples import Percentiles, RequestRecord

SCHEMA = "pytest-mm27-samples"
VERSION = 1
GZIP_FROM = 1 << 18         # 256 KiB of text: below it a plain file stays greppable
_FIELDS = ("index", "endpoint", "worker", "scheduled", "slot_free", "sent", "end", "ok", "error",
           "output_tokens", "prompt_tokens", "ramp", "chunk_times")


# What a request may carry besides its record: a replayed trace's ids.
EXTRA_FIELDS = ("prefix_id", "session_id")


@dataclass
class Sample:
    record: RequestRecord
    measured: bool
    extra: dict[str, Any] = field(default_factory=dict)


def _line(rec: RequestRecord, measured: bool, extra: Mapping[str, Any] | None) -> str:
    data: dict[str, Any] = {k: getattr(rec, k) for k in _FIELDS}
    data["measured"] = measured
    data.update({k: v for k, v in (extra or {}).items() if v is not None})
    return json.dumps(data, separators=(",", ":"))


def write_samples(base: Path, samples: Iterable[tuple[RequestRecord, bool]], header: dict[str, Any],
                  extras: Mapping[int, Mapping[str, Any]] | None = None) -> Path:
    """Write ``base`` + ``.jsonl`` (or ``.jsonl.gz`` when large) atomically; returns the path written.

    ``extras``: per request index, fields to keep with its line (``EXTRA_FIELDS``)."""
    extras = extras or {}
    lines = [json.dumps({"schema": SCHEMA, "version": VERSION, **header}, separators=(",", ":"))]
    lines.extend(_line(r, m, extras.get(r.index)) for r, m in samples)
    text = ("\n".join(lines) + "\n").encode()
    big = len(text) >= GZIP_FROM
    path = base.with_name(base.name + (".jsonl.gz" if big else ".jsonl"))
    data = gzip.compress(text, compresslevel=6, mtime=0) if big else text
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise Mm27Error(f"cannot write samples {path}: {exc.strerror or exc}") from exc
    return path


def read_samples(path: Path) -> tuple[dict[str, Any], list[Sample]]:
    """The header and the requests of a samples file; a bad line is an error naming file and line."""
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise Mm27Error(f"cannot read samples {path}: {exc}") from exc
    header: dict[str, Any] | None = None
    out: list[Sample] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if header is None:
                if data.get("schema") != SCHEMA or data.get("version") != VERSION:
                    raise ValueError(f"not a {SCHEMA} version {VERSION} header")
                header = data
                continue
            measured = bool(data.pop("measured"))
            extra = {k: data.pop(k) for k in EXTRA_FIELDS if k in data}
            out.append(Sample(RequestRecord(**data), measured, extra))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise Mm27Error(f"{path}:{number}: bad sample line: {exc}") from None
    if header is None:
        raise Mm27Error(f"{path}: empty samples file")
    return header, out


def merge(files: Sequence[Path]) -> list[RequestRecord]:
    """The measured requests of several trials' files, as one sample (for merged percentiles)."""
    out: list[RequestRecord] = []
    for f in files:
        out.extend(s.record for s in read_samples(f)[1] if s.measured)
    return out


def latency_percentiles(records: Sequence[RequestRecord]) -> dict[str, Percentiles]:
    """TTFT, TPOT, ITL and E2EL (ms) of the successful requests, as the level computes them."""
    from ..loadgen.metrics import _latencies
    blocks = _latencies([r for r in records if r.ok], 1)
    return {k: v for k, v in blocks.items() if k.endswith("_ms")}
