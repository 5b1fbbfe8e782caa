"""One measured level as a test sees it: figures to assert on and an SLO check.

``Deployment.run`` returns a :class:`Result`. Its figures are the level's
own (the median trial's, the one floors are judged on); latencies are in
milliseconds, throughput in tokens per second. :meth:`Result.check` fails
with the same wording as a floors file's floor or ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gate.slo import from_mapping, misses
from .loadgen.samples import Percentiles
from .records.model import ERROR, FAIL, INVALID, PASS, LevelResult, Trial, Verdict


class SloMiss(AssertionError):
    """A level missed a limit a test set (an AssertionError, so pytest reports it as a failure)."""


class NotMeasured(AssertionError):
    """The level has no figures: the deployment did not boot, or died, before it was measured."""


@dataclass(frozen=True)
class Result:
    level: LevelResult
    deployment: str         # the deployment's name (its record's topology)
    workload: str           # the workload's name, a variant's included

    # ---- what the gate said ------------------------------------------------------------
    @property
    def verdict(self) -> Verdict:
        """PASS, FAIL (errors, a floor or ceiling from the floors file, a regression against the
        baseline), INVALID (client- or front-end-bound: not a measurement of the server) or ERROR."""
        return self.level.verdict

    @property
    def passed(self) -> bool:
        return self.verdict.status == PASS

    @property
    def failed(self) -> bool:
        return self.verdict.status in (FAIL, ERROR)

    @property
    def invalid(self) -> bool:
        return self.verdict.status == INVALID

    # ---- what was measured ---------------------------------------------------------------
    @property
    def concurrency(self) -> int:
        return self.level.concurrency

    @property
    def case(self) -> str | None:
        return self.level.case

    @property
    def trials(self) -> list[Trial]:
        return self.level.trials

    @property
    def metrics(self) -> Trial:
        """The level's figures (the median trial by output tok/s)."""
        metrics = self.level.metrics
        if metrics is None:
            raise NotMeasured(f"{self.deployment} c={self.concurrency} was not measured: {self.verdict.message}")
        return metrics

    @property
    def output_tok_s(self) -> float:
        return self.metrics.output_tok_s

    @property
    def stream_output_tok_s(self) -> float | None:
        return self.metrics.stream_output_tok_s

    @property
    def request_tok_s(self) -> float:
        """Successful requests per second."""
        return self.metrics.request_tok_s

    @property
    def error_rate(self) -> float:
        return self.metrics.error_rate

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        """Prompt tokens found in the servers' prefix cache over those looked up (from /metrics);
        None where a server does not export the counters."""
        return self.metrics.prefix_cache_hit_rate

    @property
    def ttft(self) -> Percentiles:
        """Time to first token, ms: ``.p50 .p90 .p99 .mean .min .max .n``."""
        return self.metrics.ttft_ms

    @property
    def tpot(self) -> Percentiles:
        """Time per output token after the first, ms."""
        return self.metrics.tpot_ms

    @property
    def itl(self) -> Percentiles:
        """Inter-token latency, ms."""
        return self.metrics.itl_ms

    @property
    def e2el(self) -> Percentiles:
        """End-to-end request latency, ms."""
        return self.metrics.e2el_ms

    def check(self, source: str = "set by the test", **limits: float) -> Result:
        """Fail unless every limit holds; returns self so calls chain.

        Limits name a metric: ``ttft_p99=2000`` (ms, a ceiling), ``error_rate=0.01``
        (a ceiling), ``output_tok_s=5000`` (a floor). An unknown metric is a
        ValueError listing the known ones.
        """
        slos = from_mapping(limits, source)
        if self.level.metrics is None:
            raise NotMeasured(f"{self.deployment} c={self.concurrency}: cannot check "
                              f"{', '.join(limits)}: not measured ({self.verdict.message})")
        missed = misses(self.metrics, slos)
        if missed:
            where = f"{self.deployment} · {self.workload}" + (f" · {self.case}" if self.case else "")
            raise SloMiss(f"{where}: " + "; ".join(missed))
        return self

    def __repr__(self) -> str:
        if self.level.metrics is None:
            return f"<Result {self.deployment} c={self.concurrency} {self.verdict.status or 'unmeasured'}>"
        return (f"<Result {self.deployment} c={self.concurrency} {self.output_tok_s:,.0f} tok/s "
                f"TTFT p99 {self.ttft.p99:,.0f} ms {self.verdict.status}>")


__all__ = ["ERROR", "FAIL", "INVALID", "PASS", "NotMeasured", "Result", "SloMiss"]
