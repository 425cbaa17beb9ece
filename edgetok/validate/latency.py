"""Latency against a budget: warm-up, N timed runs with device synchronisation
(through timing.interleaved, the one timer), percentiles and throughput."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

from .timing import interleaved, percentile


@dataclass
class LatencyStats:
    runs: int
    batch: int
    mean_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # images per second at the mean latency

    def to_dict(self) -> dict:
        return asdict(self)


def measure(run: Callable[[], object], sync: Callable[[], None], batch: int, runs: int = 50, warmup: int = 10) -> LatencyStats:
    """Time ``run`` (one inference) ``runs`` times after ``warmup`` untimed runs; ``sync``
    waits for the device so each timing covers the whole inference."""
    return measure_interleaved({"run": (run, sync)}, batch, runs, warmup)["run"]


def measure_interleaved(models: Mapping[str, tuple[Callable[[], object], Callable[[], None]]], batch: int,
                        runs: int = 50, warmup: int = 10) -> dict[str, LatencyStats]:
    """``models``: name -> (run, sync). Every model is warmed up, then the models take
    turns, one timed run each per round, so drift on the machine hits all of them alike."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    times = interleaved({name: (lambda run=run, sync=sync: (run(), sync())) for name, (run, sync) in models.items()},
                        repeats=runs, warmup=warmup)
    out = {}
    for name, t in times.items():
        mean = statistics.fmean(t)
        out[name] = LatencyStats(runs, batch, mean, min(t), percentile(t, 50), percentile(t, 90), percentile(t, 99),
                                 batch * 1e3 / mean)
    return out
