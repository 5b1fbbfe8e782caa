"""The actor that runs one server on its node: start, watch, read its log, stop, check.

A plain class: :mod:`.launcher` wraps it with ``ray.remote`` and places it in
the server's placement group, so this module imports without Ray. Every
method runs on the server's node; the process work (families, signals,
leftover checks, shared-memory cleanup) is the local launcher's own code
from :mod:`pytest_mm27.host`, applied there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..host import cleanup
from ..host.ports import pick_port
from ..host.processes import Family, describe, exit_status, process_table, wait_gone

# argv[0] the driver writes for "the Python on the node" (the simulator's own interpreter)
NODE_PYTHON = "{node-python}"
READ_CHUNK = 1 << 20
KILL_WAIT_S = 5.0


class ServerActor:
    def __init__(self, name: str):
        self.name = name
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"mm27-ray-{name}-"))
        self.log_path = self.work_dir / "server.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.family: Family | None = None
        self.tmp_dir: Path | None = None
        self._before = cleanup.snapshot()

    def info(self) -> dict[str, Any]:
        """Where this actor landed: node id and address, its pid, the devices Ray gave it."""
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "address": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "pid": os.getpid(),
                "gpus": [int(g) for g in ray.get_gpu_ids()], "log": str(self.log_path)}

    def free_port(self, host: str, avoid: Sequence[int]) -> int:
        return pick_port(host, set(avoid))

    def start(self, argv: Sequence[str], env: Mapping[str, str], private_tmp: bool, retry: bool) -> int:
        """Start the server under a keeper in its own session; its pid (the keeper's)."""
        command = [sys.executable if a == NODE_PYTHON else a for a in argv]
        full_env = {**os.environ, **env}
        if private_tmp:
            if self.tmp_dir is None:
                self.tmp_dir = Path(tempfile.mkdtemp(prefix=f"mm27-{self.name}-"))
            full_env["TMPDIR"] = str(self.tmp_dir)
        keeper = [sys.executable, "-m", "pytest_mm27.cluster.keeper", str(os.getpid()), "--", *command]
        with self.log_path.open("ab") as fh:
            if retry:
                fh.write(b"\n# mm27: ---- retry ----\n")
                fh.flush()
            self.popen = subprocess.Popen(keeper, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                          env=full_env, start_new_session=True, close_fds=True)
        self.family = Family(self.popen.pid)
        self.family.remember()
        return self.popen.pid

    def status(self) -> int | None:
        """The server's exit status (Popen style), None while it runs."""
        if self.popen is None:
            return None
        if self.family is not None:
            self.family.remember()
        return exit_status(self.popen)

    def read_log(self, offset: int) -> bytes:
        """The log from ``offset`` on (at most a chunk; call again for more)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                return fh.read(READ_CHUNK)
        except FileNotFoundError:
            return b""

    def kill_now(self) -> None:
        """SIGKILL a failed attempt's group and reap it (before a retry)."""
        if self.popen is None or self.family is None:
            return
        table = process_table()
        self.family.remember(table)
        self.family.signal(signal.SIGKILL, table)
        wait_gone([self.family], time.monotonic() + KILL_WAIT_S)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=1.0)

    def stop(self, grace_s: float) -> dict[str, Any]:
        """SIGTERM, SIGINT, SIGKILL as the local launcher does; then what is left on this node."""
        report: dict[str, Any] = {"exit_code": None, "killed": False, "leftovers": [], "removed": [], "errors": []}
        if self.popen is None or self.family is None:
            return report
        start = time.monotonic()
        for sig, until in ((signal.SIGTERM, start + grace_s / 2), (signal.SIGINT, start + grace_s)):
            table = process_table()
            self.family.remember(table)
            if not self.family.alive(table):
                break
            self.family.signal(sig, table)
            wait_gone([self.family], until)
        table = process_table()
        if self.family.alive(table):
            report["killed"] = True
            self.family.signal(signal.SIGKILL, table)
            wait_gone([self.family], time.monotonic() + KILL_WAIT_S)
        # Checked before reaping, while the keeper's pid (the group id) is still reserved.
        table = process_table()
        report["leftovers"] = [describe(pid) for pid in self.family.alive(table)]
        try:
            self.popen.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            report["errors"].append(f"pid {self.popen.pid} did not exit")
        report["exit_code"] = self.popen.returncode
        removed, errors = cleanup.remove_leftovers(self._before, [self.tmp_dir] if self.tmp_dir else [])
        report["removed"], report["errors"] = removed, report["errors"] + errors
        return report

    def close(self) -> None:
        """Remove this actor's folder on the node (the driver has the log by now)."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
