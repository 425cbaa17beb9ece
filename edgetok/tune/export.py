"""``edgetok export --schedule auto --target CONFIG``: per-layer r chosen for the
export config's backend by edgetok.tune.auto (DiffRate-style greedy search,
arXiv:2305.17997, on a measured cost table), recorded in the manifest.

The backend is the one the config runs: ONNX Runtime CPU or CUDA, whose cost
tables are measured here (or on the device, then found in the cache). A
TensorRT config cannot be measured without TensorRT, so it is refused with a
one-line error instead of being guessed from another backend's costs. The
search never returns a schedule predicted slower than the unreduced model on
that backend: it returns r=0 everywhere and says why.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

from torch import nn

from ..errors import ScheduleError


def backend_for(config) -> str:
    """The cost-table backend of an export config (ort-cpu / ort-cuda)."""
    from .auto import backend_for_config

    if config.runtime == "tensorrt":
        raise ScheduleError(
            f"--schedule auto cannot measure config {config.name!r}: it runs TensorRT, whose costs cannot be "
            "measured without TensorRT; use an ONNX Runtime target (--target cpu-ort or cuda-ort) or give the "
            "schedule (--r 8)"
        )
    return backend_for_config(config)


def check_method(method: str) -> None:
    from ..reduce.registry import get_method

    spec = get_method(method)
    if spec.kind != "blocks" or "r" not in inspect.signature(spec.build).parameters:
        raise ScheduleError(f"--schedule auto chooses a per-layer r, which method {method!r} does not take; "
                            "use --method tome (or diffrate), or give the method's parameters instead")


def choose(model: nn.Module, config, method: str = "tome", batch: Optional[int] = None,
           budget_ms: Optional[float] = None, min_speedup: Optional[float] = None,
           cache: Optional[os.PathLike] = None, table=None, images=None, repeats: int = 10):
    """(AutoSchedule, manifest record) for ``model`` on ``config``'s backend at ``batch``
    (default: the config's opt batch). ``table`` replaces the measured/cached cost table."""
    from .auto import auto_schedule, measure_table

    if (budget_ms is None) == (min_speedup is None):
        raise ScheduleError("--schedule auto needs exactly one goal: --min-speedup X or --budget-ms Y")
    if config is None:
        raise ScheduleError("--schedule auto needs the device it is for: --target CONFIG (e.g. cpu-ort)")
    check_method(method)
    backend = backend_for(config)
    batch = batch or config.batch.opt
    if table is None:  # measured once per model shape / backend / batch / machine, then cached
        table = measure_table(model, backend, batch, repeats, method=method, cache=cache)
    result = auto_schedule(model, backend=backend, batch=batch, method=method, budget_ms=budget_ms,
                           min_speedup=min_speedup, images=images, table=table)
    record = {
        "source": "auto",
        "method": method,
        "r": list(result.r),
        "goal": {"budget_ms": budget_ms} if budget_ms is not None else {"min_speedup": min_speedup},
        "backend": backend,
        "batch": batch,
        "predicted_speedup": result.predicted_speedup,
        "predicted_ms": result.predicted_ms,
        "baseline_ms": result.baseline_ms,
        "fidelity": result.fidelity,
        "goal_met": result.goal_met,
        "reduced": result.reduced,
        "reason": result.reason,
        "cost_table": table.key,
    }
    return result, record


def summary(record: dict) -> str:
    """One line for the terminal: the chosen schedule and why."""
    return (f"auto schedule for {record['backend']} batch {record['batch']}: r={record['r']} "
            f"(predicted {record['predicted_speedup']:.2f}x, fidelity {record['fidelity']:.3f}): {record['reason']}")

