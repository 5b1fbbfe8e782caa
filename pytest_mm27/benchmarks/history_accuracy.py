"""Does the history find the nights a number moved, and only those?

    python -m pytest_mm27.benchmarks.history_accuracy [--series 1000] [--noise 0.03] [--seed 1]

Synthetic nightly histories of output tok/s with lognormal night-to-night
noise of ``--noise`` (3 %), judged by ``history.changepoints`` and
``history.gate`` exactly as the plugin judges a stored series:

- step: 60 nights, a 10 % slowdown from a night drawn in 10..50; found when
  a change point lands on that night +-1.
- flat: 60 unchanged nights; every change point is a false one (rate per
  100 series), and so is every gate failure.
- drift: 20 flat nights, then 1 % slower a week; the gate runs after every
  night, as a nightly job would, and the drift counts as flagged when it
  fails within 4 weeks of the night the true slowdown passed the 5 %
  tolerance. Failing earlier is also counted (as early) and is no miss.

Rates carry Wilson 95 % intervals. Nothing here is timed; the figures depend
only on the seed.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from collections.abc import Sequence

from ..history.changepoints import find_change_points
from ..history.gate import judge_values
from ..history.series import RunInfo, SeriesKey

TOLERANCE = 0.05
NIGHTS = 60
KEY = SeriesKey("sim-h200", "synthetic", "default", 16, "", "throughput")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(hits: int, n: int) -> str:
    lo, hi = wilson(hits, n)
    return f"{hits / n:6.1%} [{lo:.1%}, {hi:.1%}] ({hits}/{n})"


def noisy(true: Sequence[float], noise: float, rng: random.Random) -> list[float]:
    return [v * math.exp(rng.gauss(0.0, noise)) for v in true]


def runs(n: int) -> list[RunInfo]:
    return [RunInfo(f"night-{i}", KEY.hardware, KEY.topology, KEY.workload, git_commit=f"c{i:04d}",
                    engine="vllm", engine_version="0.11", seq=i) for i in range(n)]


def step_trial(rng: random.Random, noise: float, size: float) -> tuple[bool, bool]:
    at = rng.randint(10, 50)
    values = noisy([1000.0] * at + [1000.0 * (1 - size)] * (NIGHTS - at), noise, rng)
    cps = find_change_points(values, higher_is_better=True)
    found = any(abs(cp.index - at) <= 1 for cp in cps)
    verdict = judge_values(KEY, runs(NIGHTS), values, cps, TOLERANCE)
    return found, verdict.failed


def flat_trial(rng: random.Random, noise: float) -> tuple[int, bool]:
    values = noisy([1000.0] * NIGHTS, noise, rng)
    cps = find_change_points(values, higher_is_better=True)
    return len(cps), judge_values(KEY, runs(NIGHTS), values, cps, TOLERANCE).failed


def drift_trial(rng: random.Random, noise: float, weekly: float, flat: int = 20,
                grace: int = 28) -> tuple[int | None, int]:
    """The night the gate first fails, relative to the night the true drift passed the tolerance."""
    per_night = (1 - weekly) ** (1 / 7)
    passes = flat + math.ceil(math.log(1 - TOLERANCE) / math.log(per_night))
    total = passes + grace + 1
    true = [1000.0 * per_night ** max(0, i - flat) for i in range(total)]
    values = noisy(true, noise, rng)
    info = runs(total)
    for night in range(flat + 1, total):
        head = values[:night + 1]
        cps = find_change_points(head, higher_is_better=True)
        if judge_values(KEY, info[:night + 1], head, cps, TOLERANCE).failed:
            return night - passes, passes
    return None, passes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.benchmarks.history_accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=1000, help="histories per scenario (drift: a third)")
    ap.add_argument("--noise", type=float, default=0.03)
    ap.add_argument("--step", type=float, default=0.10)
    ap.add_argument("--drift", type=float, default=0.01, help="slowdown per week")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    n = args.series

    steps = [step_trial(rng, args.noise, args.step) for _ in range(n)]
    flats = [flat_trial(rng, args.noise) for _ in range(n)]
    n_drift = max(1, n // 3)
    drifts = [drift_trial(rng, args.noise, args.drift) for _ in range(n_drift)]

    print(f"history change points: {NIGHTS} nights, {args.noise:.0%} noise, tolerance {TOLERANCE:.0%}, "
          f"seed {args.seed}")
    print(f"  {args.step:.0%} step found at its night +-1 (goal >= 95%): "
          f"{rate(sum(f for f, _ in steps), n)}")
    print(f"  {args.step:.0%} step fails the history gate:           {rate(sum(g for _, g in steps), n)}")
    false_cps = sum(c for c, _ in flats)
    print(f"  flat: false change points per 100 series (goal < 1): {100 * false_cps / n:.2f} "
          f"(series with any: {rate(sum(1 for c, _ in flats if c), n)})")
    print(f"  flat: gate failures:                                 {rate(sum(g for _, g in flats), n)}")
    delays = [d for d, _ in drifts if d is not None]
    within = sum(1 for d in delays if d <= 28)
    early = sum(1 for d in delays if d < 0)
    print(f"  {args.drift:.0%}/week drift flagged within 4 weeks of passing {TOLERANCE:.0%} (after 20 flat "
          f"nights, gate run nightly): {rate(within, n_drift)}")
    if delays:
        print(f"    nights from passing the tolerance to the first failure: median "
              f"{statistics.median(delays):+.0f}, range {min(delays):+d}..{max(delays):+d}; "
              f"before passing it: {rate(early, n_drift)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
