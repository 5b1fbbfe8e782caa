"""A served simulator process for the arrival, goodput and samples tests (no pytest plugin involved)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sim-model"
# A TP=2 replica of the calibrated model: its steps are tens of milliseconds, so a few
# requests/s load it visibly and a few dozen saturate it.
SIM_ARGS = ("--hardware", "rtx-pro-6000", "--model", "minimax-m2.7-nvfp4", "--tensor-parallel-size", "2",
            "--max-num-seqs", "64", "--max-model-len", "4096", "--gpu-memory-utilization", "0.9")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sim:
    """``python -m pytest_mm27.sim serve`` in its own session; up once ``/health`` (or, with
    ``wait_healthy=False``, ``/version``) answers 200."""

    def __init__(self, log_dir: Path, *extra: str, wait_healthy: bool = True, timeout: float = 30.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"sim-{self.port}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        argv = [sys.executable, "-m", "pytest_mm27.sim", "serve", "--port", str(self.port),
                "--served-model-name", MODEL, *SIM_ARGS, *extra]
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)
        try:
            self.wait_up("/health" if wait_healthy else "/version", timeout)
        except BaseException:
            self.stop()
            raise

    def wait_up(self, path: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sim exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"sim did not come up:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = Sim(tmp_path_factory.mktemp("sim"))
    yield s
    s.stop()
