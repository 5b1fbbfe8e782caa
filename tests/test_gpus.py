"""GPU discovery (real nvidia-smi parsing via a stand-in on PATH) and leases."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_mm27.errors import LaunchError
from pytest_mm27.host.gpus import GpuInfo, check_free_memory, discover_gpus, parse_nvidia_smi
from pytest_mm27.host.leases import lease_devices

SMI_ROWS = (
    "0, GPU-aaaa-0000, NVIDIA RTX PRO 6000 Blackwell Workstation Edition, 97887, 3, 575.57.08\n"
    "1, GPU-bbbb-1111, NVIDIA RTX PRO 6000 Blackwell Workstation Edition, 97887, 45000, 575.57.08\n"
    "2, GPU-cccc-2222, NVIDIA RTX PRO 6000 Blackwell Workstation Edition, 97887, 0, 575.57.08\n"
)


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """An `nvidia-smi` on PATH answering the queries gpus.py makes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(
        f"#!{sys.executable}\nimport sys\n"
        "if any(a.startswith('--query-compute-apps') for a in sys.argv):\n"
        "    print('GPU-bbbb-1111, 4242, /usr/bin/python3, 44990')\n"
        f"else:\n    sys.stdout.write({SMI_ROWS!r})\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)     # force the nvidia-smi path
    return script


def test_discover_gpus_is_empty_here_without_crashing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert discover_gpus() == []


def test_discover_gpus_parses_nvidia_smi(fake_smi):
    gpus = discover_gpus()
    assert [g.index for g in gpus] == [0, 1, 2]
    assert gpus[1] == GpuInfo(1, "GPU-bbbb-1111", "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
                              97887, 45000, "575.57.08")


def test_discover_gpus_honors_cuda_visible_devices(fake_smi, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert [g.index for g in discover_gpus()] == [2, 0]      # physical indices, CUDA's order
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert discover_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    assert [g.index for g in discover_gpus()] == [1]


def test_parse_nvidia_smi_skips_bad_rows():
    assert parse_nvidia_smi("0, u, n, [N/A], 1, d\ngarbage\n") == []


def test_check_free_memory_refuses_busy_gpus(fake_smi):
    check_free_memory([0, 2], threshold_mb=1024)
    with pytest.raises(LaunchError) as info:
        check_free_memory([0, 1, 2], threshold_mb=1024)
    msg = str(info.value)
    assert "GPU 1 (NVIDIA RTX PRO 6000" in msg and "45000 of 97887 MiB in use" in msg
    assert "pid 4242" in msg and "GPU 0" not in msg and "GPU 2" not in msg


def test_two_disjoint_leases_in_one_process(tmp_path):
    with lease_devices(1, kind="cpu", lock_dir=tmp_path, candidates=[0]) as a, \
            lease_devices(1, kind="cpu", lock_dir=tmp_path, candidates=[1]) as b:
        assert a.devices == (0,) and b.devices == (1,)
    assert a.closed and b.closed


def test_lease_takes_the_first_free_devices(tmp_path):
    with lease_devices(2, kind="gpu", lock_dir=tmp_path, candidates=[0, 1, 2, 3]) as a:
        with lease_devices(2, kind="gpu", lock_dir=tmp_path, candidates=[0, 1, 2, 3]) as b:
            assert a.devices == (0, 1) and b.devices == (2, 3)


def test_overlapping_lease_names_the_holder(tmp_path):
    with lease_devices(2, kind="gpu", lock_dir=tmp_path, candidates=[0, 1], owner="run A"):
        with pytest.raises(LaunchError) as info:
            lease_devices(2, kind="gpu", lock_dir=tmp_path, candidates=[1, 2])
    msg = str(info.value)
    assert "need 2 free GPU(s) of [1, 2] but only 1 are free" in msg
    assert f"GPU 1: held by run A (pid {os.getpid()}" in msg
    # The failed attempt released GPU 2 again, and the first lease is gone now.
    with lease_devices(2, kind="gpu", lock_dir=tmp_path, candidates=[1, 2]) as lease:
        assert lease.devices == (1, 2)


def _hold_in_child(tmp_path: Path, devices: list[int], seconds: float) -> subprocess.Popen[str]:
    code = (
        "import sys, time\n"
        "from pytest_mm27.host.leases import lease_devices\n"
        f"lease = lease_devices({len(devices)}, kind='gpu', lock_dir={str(tmp_path)!r}, candidates={devices!r},"
        " owner='other pytest')\n"
        "print('held', flush=True)\n"
        f"time.sleep({seconds})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_lease_held_by_another_process_blocks_until_it_dies(tmp_path):
    holder = _hold_in_child(tmp_path, [0], 60)
    try:
        with pytest.raises(LaunchError, match=rf"GPU 0: held by other pytest \(pid {holder.pid}"):
            lease_devices(1, kind="gpu", lock_dir=tmp_path, candidates=[0])
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the lock with the process: no stale lease.
    with lease_devices(1, kind="gpu", lock_dir=tmp_path, candidates=[0]) as lease:
        assert lease.devices == (0,)


def test_lease_waits_up_to_timeout(tmp_path):
    holder = _hold_in_child(tmp_path, [0], 1.0)
    try:
        t0 = time.monotonic()
        with lease_devices(1, kind="gpu", lock_dir=tmp_path, candidates=[0], timeout_s=60) as lease:
            assert lease.devices == (0,)
        assert time.monotonic() - t0 < 60
    finally:
        holder.kill()
        holder.wait()


def test_cpu_lease_defaults_to_affinity_cores(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    with lease_devices(1, kind="cpu", lock_dir=tmp_path) as lease:
        assert lease.devices == (cores[0],) and lease.kind == "cpu"
    with pytest.raises(LaunchError, match="only"):
        lease_devices(len(cores) + 1, kind="cpu", lock_dir=tmp_path)
    assert lease_devices(0, kind="gpu", lock_dir=tmp_path).devices == ()


def test_default_lock_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MM27_LOCK_DIR", str(tmp_path / "locks"))
    with lease_devices(1, kind="cpu", candidates=[0]) as lease:
        assert lease.lock_dir == tmp_path / "locks"
        assert (tmp_path / "locks" / "cpu0.lock").exists()
