"""``validate``: latency (p50/p90/p99, throughput) of one export on one backend
against a budget, parity against the torch model where available, and the
unreduced baseline measured in the same run when given.

Speed claims are ratios against the baseline measured in the same process,
with the ideal FLOPs ratio from the two manifests beside them.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EdgetokError
from ..runtime.artifacts import write_json
from ..runtime.session import Session, load
from .latency import measure_interleaved
from .parity import compare


def _inputs(sess: Session, batch: int, seed: int = 0) -> np.ndarray:
    shape = sess.input.with_batch(batch)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _describe(sess: Session, stats) -> dict:
    m = sess.manifest
    return {
        "path": str(sess.artifacts.root if sess.artifacts else "module"),
        "backend": sess.backend,
        "model": m.model if m else None,
        "method": m.method if m else None,
        "params": m.params if m else None,
        "tokens": m.tokens if m else None,
        "flops": m.flops if m else None,
        "latency": stats.to_dict(),
    }


def _gflops(m) -> Optional[float]:
    total = (m.flops or {}).get("total") if m else None
    return float(total) if isinstance(total, (int, float)) and total > 0 else None


def validate(
    path,
    backend: Optional[str] = None,
    budget_ms: Optional[float] = None,
    batch: int = 1,
    runs: int = 50,
    warmup: int = 10,
    baseline=None,
    torch_model=None,
    atol: float = 1e-4,
    report_path=None,
    **options,
) -> dict:
    """Measure ``path``; returns the report dict (``passed`` False when p99 > budget_ms).
    With ``baseline`` the two take turns run by run (interleaved) in the same process."""
    if baseline is not None:
        options = {"interleaved": True, **options}  # two ORT sessions taking turns: no spinning idle threads
    sess = load(path, backend=backend, **options)
    base = load(baseline, backend=backend, **options) if baseline is not None else None
    if base is not None:
        _comparable(sess, base, path, baseline)
    x = _inputs(sess, batch)
    report = {"schema": "edgetok.validate/1", "machine": _machine(), "batch": batch, "runs": runs, "warmup": warmup,
              "budget_ms": budget_ms}
    timed = {"model": (lambda: sess.run_prepared(x), sess.sync)}
    if base is not None:
        xb = _inputs(base, batch)
        timed["baseline"] = (lambda: base.run_prepared(xb), base.sync)
    stats = measure_interleaved(timed, batch, runs, warmup)
    report["model"] = _describe(sess, stats["model"])
    if torch_model is not None or _has_torch(sess):
        ref = load(path, backend="torch", preprocess=False, **({"module": torch_model} if torch_model is not None else {}))
        out = sess.run_prepared(x)
        ref_out = ref.run_prepared(x)
        name = sess.output_names[0]
        report["parity"] = {"output": name, **compare(out[name], next(iter(ref_out.values())), atol)}
    else:
        report["parity"] = {"skipped": "no torch model (pass torch_model= or save model.pt2 in the export dir)"}
    if base is not None:
        report["baseline"] = _describe(base, stats["baseline"])
        b, r = report["baseline"]["latency"], report["model"]["latency"]
        report["speedup"] = {
            "p50": b["p50_ms"] / r["p50_ms"],
            "p99": b["p99_ms"] / r["p99_ms"],
            "throughput": r["throughput"] / b["throughput"],
            "flops_ideal": (_gflops(base.manifest) / _gflops(sess.manifest))
            if _gflops(base.manifest) and _gflops(sess.manifest) else None,
        }
    p99 = report["model"]["latency"]["p99_ms"]
    report["passed"] = budget_ms is None or p99 <= budget_ms
    if budget_ms is not None and not report["passed"]:
        report["failure"] = f"p99 {p99:.3f} ms exceeds the budget of {budget_ms} ms"
    if report_path:
        write_json(Path(report_path), report)
    return report


def _comparable(sess: Session, base: Session, path, baseline) -> None:
    """A speed-up means something only against the same model at the same input."""
    if list(sess.input.shape) != list(base.input.shape):
        raise EdgetokError(f"--baseline {baseline} takes input {base.input.shape}, {path} takes {sess.input.shape}; "
                           "export the baseline for the same input size")
    m, b = sess.manifest, base.manifest
    if m is not None and b is not None:
        if m.model != b.model or m.family != b.family:
            raise EdgetokError(f"--baseline {baseline} is model {b.model!r}, {path} is {m.model!r}; pass the "
                               "unreduced export of the same model")
        if m.seed != b.seed:
            raise EdgetokError(f"--baseline {baseline} was exported with weights seed {b.seed}, {path} with "
                               f"{m.seed}: two different networks; export both with the same --seed or --weights")


def _has_torch(sess: Session) -> bool:
    from ..runtime.backends import TORCH_FILES

    return sess.backend != "torch" and sess.artifacts is not None and any(
        (sess.artifacts.root / f).exists() for f in TORCH_FILES
    )


def _machine() -> dict:
    import os

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
    from ..runtime.env import gpu_info, tensorrt_version

    gpu = gpu_info()
    info["gpu"] = gpu.to_dict() if gpu else None
    info["tensorrt"] = tensorrt_version()
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info
