"""Interleaved latency measurement: the reduced and the unreduced model take
turns, so machine noise (another job, frequency changes) hits both alike.

ONNX Runtime sessions need care when they take turns: each session owns an
intra-op thread pool whose threads spin for a while after a run, and on a
small machine the idle session's spinning threads take the cores from the
session being timed (measured here, 2 cores, ViT-Ti/16 batch 1: 14 ms alone,
25-30 ms when two sessions alternate). ``ort_session_options`` is the one place
edgetok sets session threads: sessions that alternate turn spinning off, and a
benchmark process can instead give all its sessions one shared pool
(``share_ort_threads``), which keeps spinning and costs alternating sessions
almost nothing (15 ms against 14 ms alone in the same measurement).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Optional

_SHARED_ORT_THREADS: Optional[int] = None


def share_ort_threads(threads: int) -> None:
    """Give every ONNX Runtime session edgetok creates from now on one process-wide
    intra-op pool of ``threads`` threads. ONNX Runtime then refuses sessions that ask
    for their own pool, so call this only in processes whose sessions all come from
    edgetok (the benchmark scripts), before their first session."""
    global _SHARED_ORT_THREADS
    import onnxruntime.capi._pybind_state as C

    C.set_global_thread_pool_sizes(int(threads), 1)
    _SHARED_ORT_THREADS = int(threads)


def ort_threading() -> str:
    """How this process's sessions are threaded (recorded next to ORT timings)."""
    if _SHARED_ORT_THREADS:
        return f"one shared pool of {_SHARED_ORT_THREADS} threads"
    return "a pool per session (spinning off where sessions alternate)"


def ort_session_options(threads: Optional[int] = None, interleaved: bool = False):
    """SessionOptions for every session edgetok creates. ``interleaved``: this session
    takes turns with others in one timing loop, so its idle threads must not spin."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if _SHARED_ORT_THREADS:
        opts.use_per_session_threads = False
        return opts
    if threads:
        opts.intra_op_num_threads = int(threads)
    if interleaved:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def sync(device: str = "cpu") -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int = 20, warmup: int = 3, device: str = "cpu"):
    """Run every function ``warmup`` times, then ``repeats`` rounds of one call
    each in turn. Returns {name: [milliseconds per call]}."""
    for _ in range(warmup):
        for fn in fns.values():
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


def percentile(values, q: float) -> float:
    s = sorted(values)
    if not s:
        raise ValueError("no timings")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values) -> dict:
    return {
        "p50_ms": statistics.median(values),
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
        facts["onnxruntime_threads"] = ort_threading()
    except ImportError:
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts
