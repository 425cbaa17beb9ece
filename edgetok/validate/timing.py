"""The one timer of edgetok: interleaved latency measurement (the reduced and the
unreduced model take turns, so machine noise, another job or frequency changes,
hits both alike), the one percentile, and the machine facts reported next to
every figure. Sessions that take turns here are made with ``interleaved=True``
(edgetok/runtime/backends.py explains why their idle threads must not spin).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def sync(device: str = "cpu") -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int = 20, warmup: int = 3, device: str = "cpu"):
    """Run every function ``warmup`` times, then ``repeats`` rounds of one call
    each in turn. Returns {name: [milliseconds per call]}."""
    for fn in fns.values():  # warm-up per function, then one timed call each per round
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


class Stopwatch:
    """Milliseconds since it was made (``ms``), for timings that are not a loop over
    models: a frame of a stream, a request under load, the wall time of a load test."""

    def __init__(self):
        self.start = time.perf_counter()

    @property
    def ms(self) -> float:
        return (time.perf_counter() - self.start) * 1e3


def percentile(values, q: float) -> float:
    s = sorted(values)
    if not s:
        raise ValueError("no timings")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values) -> float:
    return percentile(values, 50)


def summary(values) -> dict:
    return {
        "p50_ms": median(values),
        "p90_ms": percentile(values, 90),
        "p99_ms": percentile(values, 99),
        "mean_ms": statistics.fmean(values),
        "runs": len(values),
    }


def machine_facts() -> dict:
    """What a timing was measured on (reported next to every figure)."""
    import os
    import platform

    import torch

    facts = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        if names:
            facts["cpu"] = names[0]
    except OSError:
        pass
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
        from ..runtime.backends import ort_threading

        facts["onnxruntime_threads"] = ort_threading()
    except ImportError:
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts
