from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_mm27.host.processes import processes_under

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ray: runs a local Ray cluster (select with -m ray, leave out with -m 'not ray')")
    # test_vllm_real groups its tests on one xdist worker (an optimisation: its
    # host-wide lock is what keeps vLLM boots apart); without xdist the mark is a label.
    if not config.pluginmanager.hasplugin("xdist"):
        config.addinivalue_line("markers", "xdist_group(name): run these tests on one pytest-xdist worker")


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
