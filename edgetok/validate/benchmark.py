"""Reduced-vs-baseline comparison shared by ``edgetok demo``, ``edgetok bench``
and benchmarks/: FLOPs ratio (the ideal) next to the measured speed ratio,
both against the unreduced model timed in the same interleaved run."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..patch.api import flops
from .timing import interleaved, summary


def compare(base: nn.Module, variants: Mapping[str, nn.Module], x: torch.Tensor, repeats: int = 10, warmup: int = 3,
            device: str = "cpu") -> list[dict]:
    """One row per model (baseline first): tokens per layer, GFLOPs, FLOPs ratio,
    latency p50/p90, throughput, speed ratio and share of the ideal."""
    models = {"baseline": base, **variants}
    fns = {name: (lambda m=m: m(x)) for name, m in models.items()}
    with torch.inference_mode():
        times = interleaved(fns, repeats=repeats, warmup=warmup, device=device)
        reports = {name: flops(m, inputs=x[:1]) for name, m in models.items()}
    base_ms = summary(times["baseline"])["p50_ms"]
    rows = []
    for name, model in models.items():
        lat = summary(times[name])
        flops_ratio = reports[name].ratio_to(reports["baseline"])
        speed = base_ms / lat["p50_ms"]
        rows.append({
            "model": name,
            "method": getattr(getattr(model, "edgetok_plan", None), "method", None),
            "params": getattr(getattr(model, "edgetok_plan", None), "params", {}),
            "batch": int(x.shape[0]),
            "tokens": reports[name].tokens,
            "gflops": reports[name].total / 1e9,
            "flops_ratio": flops_ratio,
            "p50_ms": lat["p50_ms"],
            "p90_ms": lat["p90_ms"],
            "throughput_per_s": x.shape[0] * 1e3 / lat["p50_ms"],
            "speed_ratio": speed,
            "share_of_ideal": speed / flops_ratio,
        })
    return rows
