"""ONNX Runtime CPU latency of edgetok exports vs the unreduced export of the same model.

For each model (default vit_small_patch16_224 and vit_base_patch16_224, random
weights) this exports the unreduced model and each reduced variant (ToMe and
top-k drop, portable target: the function bodies run in ORT), then times them
interleaved (baseline, variant, baseline, variant, ... in every round, so drift
hits all alike) at each batch size and reports medians, the speed-up
(baseline median / variant median) and the ideal FLOPs ratio beside it.

    python benchmarks/bench_ort.py                 # full run, JSON to benchmarks/results/
    python benchmarks/bench_ort.py --quick         # smoke run: tiny model, few repeats

Not a test: numbers depend on the machine; the JSON records its facts.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

# (model, method, params): ToMe r as in the paper's speed settings (ViT-S r=13, ViT-B r=16, clamped at the last
# layer as the reference code does),
# EViT's keep rate 0.7 at layers 3, 6, 9
VARIANTS = {
    "vit_small_patch16_224": [("tome", {"r": 13}), ("drop", {"keep_rate": 0.7, "layers": [3, 6, 9]})],
    "vit_base_patch16_224": [("tome", {"r": 16, "clamp": True}), ("drop", {"keep_rate": 0.7, "layers": [3, 6, 9]})],
}
QUICK = {"vit_tiny_patch16_224": [("tome", {"r": 8}), ("drop", {"keep_rate": 0.7, "layers": [3, 6, 9]})]}


def session(path: str, threads: int):
    from edgetok.runtime.backends import ort_session

    return ort_session(path, threads=threads, interleaved=True)


def bench_model(name, variants, batches, repeats, warmup, threads, workdir):
    import numpy as np
    import onnx
    import timm

    import edgetok
    from edgetok.export.exporter import export_onnx
    from edgetok.validate.timing import interleaved, median, percentile

    base = timm.create_model(name, pretrained=False).eval()
    shape = (3, *base.patch_embed.img_size)
    base_flops = edgetok.flops(base, shape).total
    models = {"baseline": (base, 1.0)}
    for method, params in variants:
        reduced = edgetok.apply(base, method, **params)
        models[f"{method} {params}"] = (reduced, base_flops / edgetok.flops(reduced, shape).total)
    sessions = {}
    for label, (m, _) in models.items():
        path = os.path.join(workdir, f"{name}-{len(sessions)}.onnx")
        onnx.save(export_onnx(m, shape), path)
        sessions[label] = session(path, threads)
    rows = []
    for b in batches:
        feed = {"pixel_values": np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)}
        times = interleaved({label: (lambda s=s: s.run(None, feed)) for label, s in sessions.items()},
                            repeats=repeats, warmup=warmup)
        base_ms = median(times["baseline"])
        for label, ts in times.items():
            med = median(ts)
            rows.append({
                "model": name, "variant": label, "batch": b, "median_ms": round(med, 3),
                "p90_ms": round(percentile(ts, 90), 3),
                "speedup": round(base_ms / med, 3), "flops_ratio": round(models[label][1], 3),
            })
            print(f"{name:24s} {label:48s} bs{b:<3d} {med:8.2f} ms  speed-up {base_ms / med:5.2f}x  "
                  f"FLOPs ideal {models[label][1]:.2f}x", flush=True)
    return rows


def main(argv=None):
    import onnxruntime
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="timm model names (default: vit_small, vit_base)")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    p.add_argument("--repeats", type=int, default=30, help="interleaved rounds per batch size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ORT intra-op threads")
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny, batch 1, 5 rounds")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/ort_cpu[_quick].json)")
    a = p.parse_args(argv)
    from edgetok.runtime.backends import share_ort_threads
    from edgetok.runtime.artifacts import write_json
    from edgetok.validate.timing import machine_facts

    share_ort_threads(a.threads)  # the sessions take turns: one pool, no idle pool spinning on the cores
    variants = QUICK if a.quick else VARIANTS
    if a.models:
        variants = {m: VARIANTS.get(m, VARIANTS["vit_small_patch16_224"]) for m in a.models}
    batches, repeats = ([1], 5) if a.quick else (a.batches, a.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, vs in variants.items():
            rows += bench_model(name, vs, batches, repeats, a.warmup, a.threads, work)
    result = {
        "benchmark": "onnxruntime CPU latency, edgetok portable exports vs unreduced export",
        "machine": machine_facts() | {"ort_threads": a.threads},
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "repeats": repeats, "warmup": a.warmup, "weights": "random (timm pretrained=False)",
        "rows": rows,
    }
    out = Path(a.output or Path(__file__).parent / "results" / ("ort_cpu_quick.json" if a.quick else "ort_cpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result, sort_keys=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
