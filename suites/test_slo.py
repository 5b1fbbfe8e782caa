"""A performance test in your own words: an SLO the test states, on a middle level.

The sweep in test_throughput.py holds every level to the floors file; this
is the other style. The test takes the booted deployment of each
--topology (the ``mm27_topology`` fixture), runs the level it cares about
and asserts on what came back. Its level is recorded and compared with the
baseline like the sweep's, under the test's name.
"""

# Interactive traffic: 99 of 100 first tokens within 2 s, a typical stream at
# 20 tok/s or better (TPOT p50 at most 50 ms), and no failed request.
INTERACTIVE = {"ttft_p99": 2000.0, "tpot_p50": 50.0, "error_rate": 0.0}


def test_interactive_slo_mid_sweep(mm27_topology):
    levels = mm27_topology.levels
    result = mm27_topology.run(levels[len(levels) // 2])
    result.check(source="interactive SLO, suites/test_slo.py", **INTERACTIVE)
