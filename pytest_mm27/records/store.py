"""Run records on disk: one JSON file per (run, topology), rewritten after every level.

A crash at level 9 leaves levels 1-8 on disk: each write goes to a temporary
file that is renamed over the record, so a reader never sees half a file,
and every write passes through ``secrets.redact``, the one place that
masks secrets.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import Mm27Error
from ..secrets import redact

from .migrate import normalise
from .model import SCHEMA, SCHEMA_VERSION, LevelResult, RunError, RunRecord

def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def check_writable_dir(path: Path, what: str = "results folder") -> None:
    """Create ``path`` if needed and prove a file can be written there; raise Mm27Error naming it.

    Run before anything boots, so a bad --results-dir stops the run at once
    (the permission bits alone prove nothing when running as root).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mm27-write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = exc.filename if isinstance(exc.filename, str) and exc.filename != str(path) else None
        detail = f"{exc.strerror or exc}" + (f" ({where})" if where else "")
        raise Mm27Error(f"cannot write to the {what} {path}: {detail}") from exc


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new file, never a torn one."""
    data = redact(data)         # every JSON file we write: records, baselines, exports
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)     # mkstemp makes 0600; records are for any reader
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class RunFile:
    """One topology's record in one run, kept on disk as it grows (``record`` is the typed record)."""

    def __init__(self, path: Path, record: RunRecord):
        self.path = path
        self.record = record
        record.harness_version = record.harness_version or __version__
        record.created_at = record.created_at or now_iso()

    def save(self) -> None:
        try:
            write_json_atomic(self.path, self.record.to_dict())
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(self.path) else ""
            raise Mm27Error(f"cannot write run record {self.path}: {exc.strerror or exc}{where}") from exc

    def add_level(self, level: LevelResult) -> None:
        """Add (or replace, for a re-run level) one level's result and save."""
        self.record.put_level(level)
        self.save()

    def add_error(self, message: str, *, concurrency: int | None = None) -> None:
        self.record.errors.append(RunError(message, now_iso(), concurrency))
        self.save()

    def finish(self, status: str) -> None:
        self.record.status = status
        self.record.finished_at = now_iso()
        self.save()


def read_json_record(path: Path, what: str = "run record") -> dict[str, Any]:
    """The JSON of a record file, checked to be one and brought to this schema version."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise Mm27Error(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise Mm27Error(f"{path}: not valid JSON (corrupt or truncated record?): {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise Mm27Error(f"{path}: not a pytest-mm27 run record (field 'schema')")
    return check_version(data, str(path))


def check_version(data: dict[str, Any], source: str) -> dict[str, Any]:
    if data.get("schema_version") != SCHEMA_VERSION:
        raise Mm27Error(f"{source}: field 'schema_version' is {data.get('schema_version')!r}; "
                        f"this harness reads version {SCHEMA_VERSION}")
    return normalise(data)


def load_record(path: Path) -> RunRecord:
    return RunRecord.from_dict(read_json_record(path))
