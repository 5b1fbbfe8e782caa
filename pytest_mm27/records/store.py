"""Run records: one JSON file per (run, topology), rewritten after every level.

A crash at level 9 leaves levels 1-8 on disk: each write goes to a temporary
file that is renamed over the record, so a reader never sees half a file.
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

SCHEMA = "pytest-mm27/run-record"
SCHEMA_VERSION = 1

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


class RunRecord:
    """The record of one topology's sweep in one run, kept on disk as it grows."""

    def __init__(self, path: Path, header: Mapping[str, Any]):
        self.path = path
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "harness_version": __version__,
            "created_at": now_iso(),
            "finished_at": None,
            "status": "running",
            **header,
            "levels": [],
            "errors": [],
        }

    def save(self) -> None:
        try:
            write_json_atomic(self.path, self.data)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(self.path) else ""
            raise Mm27Error(f"cannot write run record {self.path}: {exc.strerror or exc}{where}") from exc

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    def add_level(self, level: Mapping[str, Any]) -> None:
        """Add (or replace, for a re-run level) one level's result and save."""
        levels = [lv for lv in self.data["levels"] if lv["concurrency"] != level["concurrency"]]
        levels.append(dict(level))
        levels.sort(key=lambda lv: lv["concurrency"])
        self.data["levels"] = levels
        self.save()

    def add_error(self, message: str, *, concurrency: int | None = None) -> None:
        self.data["errors"].append({"at": now_iso(), "concurrency": concurrency, "message": message})
        self.save()

    def finish(self, status: str) -> None:
        self.data["status"] = status
        self.data["finished_at"] = now_iso()
        self.save()


def load_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise Mm27Error(f"cannot read run record {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise Mm27Error(f"{path}: not valid JSON (corrupt or truncated record?): {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise Mm27Error(f"{path}: not a pytest-mm27 run record (field 'schema')")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise Mm27Error(f"{path}: field 'schema_version' is {data.get('schema_version')!r}; "
                        f"this harness reads version {SCHEMA_VERSION}")
    return data
