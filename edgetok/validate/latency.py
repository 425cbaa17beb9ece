"""Latency measurement: warm-up, N timed runs with device synchronisation,
percentiles and throughput."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import numpy as np


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
    for run, sync in models.values():
        for _ in range(warmup):
            run()
        sync()
    times = {name: np.empty(runs) for name in models}
    for i in range(runs):
        for name, (run, sync) in models.items():
            t0 = time.perf_counter()
            run()
            sync()
            times[name][i] = (time.perf_counter() - t0) * 1e3
    out = {}
    for name, t in times.items():
        p50, p90, p99 = np.percentile(t, [50, 90, 99])
        mean = float(t.mean())
        out[name] = LatencyStats(runs, batch, mean, float(t.min()), float(p50), float(p90), float(p99),
                                 batch * 1e3 / mean)
    return out
