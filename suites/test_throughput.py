"""Throughput sweep: one test per (topology, concurrency), e.g. test_throughput[dp3-c640].

Select topologies with --topology (default: all), the request shape with
--workload, and the engine with --engine (auto picks real vLLM when it is
installed and the GPUs are there, else the built-in simulator).
"""


def test_throughput(mm27_level):
    """Measure the level; fail on errors past the limit or output tok/s below its floor."""
    mm27_level.measure()
