from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]


def processes_under(path: Path) -> list[str]:
    """Processes whose working directory is inside ``path`` (ours, started by a test)."""
    found = []
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd == str(path) or cwd.startswith(str(path) + os.sep):
            found.append(f"{pid}: {cmd.strip()}")
    return found


@pytest.fixture
def no_leftovers(pytester: pytest.Pytester):
    """Fail the test if any process started under its directory outlives it."""
    yield pytester
    deadline = time.monotonic() + 5
    left = processes_under(pytester.path)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_under(pytester.path)
    assert not left, f"processes left behind: {left}"
