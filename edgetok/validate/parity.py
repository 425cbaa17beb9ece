"""Parity of a backend's outputs against the torch model on the same inputs."""
from __future__ import annotations

import numpy as np


def compare(out: np.ndarray, ref: np.ndarray, atol: float = 1e-4) -> dict:
    if out.shape != ref.shape:
        return {"ok": False, "error": f"shape {list(out.shape)} vs torch {list(ref.shape)}"}
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    a, b = out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    report = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "min_cosine": float(cos.min()), "atol": atol}
    if out.ndim == 2:  # classifier logits: does the top-1 class agree?
        report["top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).mean())
    report["ok"] = report["max_abs"] <= atol
    return report
