"""Latency measurement: warm-up, N timed runs with device synchronisation,
percentiles and throughput."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

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
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(warmup):
        run()
    sync()
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        run()
        sync()
        times[i] = (time.perf_counter() - t0) * 1e3
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    mean = float(times.mean())
    return LatencyStats(runs, batch, mean, float(times.min()), float(p50), float(p90), float(p99), batch * 1e3 / mean)
