"""A server's log file: a header saying how it was started, then everything it printed.

The header is what someone reading a failed night's log needs first: the
command (secrets masked), the environment added, the devices, the URL. The
tail goes into the error when a server dies or never becomes healthy, so
the cause is in the test report, not only in a file on the runner.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TextIO

from .plan import LaunchPlan, ServerSpec

__all__ = ["LOG_TAIL_LINES", "open_log", "read_log_tail"]

LOG_TAIL_LINES = 40
TAIL_BYTES = 256 * 1024             # enough for the lines wanted, however long a log grew


def open_log(path: Path, spec: ServerSpec, plan: LaunchPlan, tmp_dir: Path | None, *, retry: bool) -> TextIO:
    """The log file for ``spec``'s process, its header written; a retry appends to the first attempt's."""
    fh = path.open("a" if retry else "w", encoding="utf-8")
    if retry:
        fh.write(f"\n# mm27: ---- retry on port {spec.port} ----\n")
    header = [
        f"# mm27: server {spec.name} ({plan.engine} engine, topology {plan.topology.name})",
        f"# mm27: command: {spec.command_line()}",
        f"# mm27: env added: {json.dumps(spec.redacted_env(), sort_keys=True)}",
        f"# mm27: devices: {list(spec.gpus)}  url: {spec.base_url}",
        *([f"# mm27: TMPDIR: {tmp_dir}"] if tmp_dir else []),
        f"# mm27: started {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ]
    fh.write("\n".join(header) + "\n")
    fh.flush()                      # before the child writes to the same file
    return fh


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - TAIL_BYTES))
            data = fh.read()
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror or exc})"
    text = data.decode(errors="replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:]) if text else "(log is empty)"
