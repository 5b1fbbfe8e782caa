"""The scratch-catalog builders stay valid catalog files (the fault suite once wrote floors with a stale key)."""

from __future__ import annotations

import pytest

from pytest_mm27.catalog.floors import parse_floors
from pytest_mm27.testing import floors_file, sim_topology
from pytest_mm27.catalog.topology import parse_topology


def test_sim_topology_parses(tmp_path):
    path = tmp_path / "tb.toml"
    path.write_text(sim_topology("tb", [1, 2], dp=3, mode="native", serve_extra='env = { A = "1" }'))
    topo = parse_topology(path)
    assert (topo.name, topo.concurrency_levels) == ("tb", (1, 2))
    assert (topo.tensor_parallel, topo.data_parallel, topo.dp_mode) == (2, 3, "native")
    assert topo.model.spec == "minimax-m2.7-nvfp4" and dict(topo.env) == {"A": "1"}


def test_floors_file_parses(tmp_path):
    path = tmp_path / "rtx-pro-6000.toml"
    path.write_text(floors_file("tb", "quick", {4: 1e9, 8: 12.5}, note="why"))
    floors = parse_floors(path)
    assert {k: f.tok_s for k, f in floors.items()} == {("tb", "quick", 4): 1e9, ("tb", "quick", 8): 12.5}
    assert all(f.metric == "output_tok_s" and f.note == "why" for f in floors.values())


def test_xdist_groups_levels_by_topology_from_their_ids():
    pytest.importorskip("xdist")
    from pytest_mm27.plugin.xdist import topology_of
    names = ["tp4", "tp4-fp8", "dp3"]
    assert topology_of("suites/test_throughput.py::test_throughput[tp4-fp8-c64]", names) == "tp4-fp8"
    assert topology_of("suites/test_throughput.py::test_throughput[tp4-c64]", names) == "tp4"
    assert topology_of("s.py::test_x[dp3-c640]@dp3", names) == "dp3"        # older xdist's suffix
    assert topology_of("s.py::test_x[long-dp3-c8-warm]", names) == "dp3"    # among other parameters
    assert topology_of("s.py::test_x[dp30-c8]", names) is None
    assert topology_of("s.py::test_other", names) is None
