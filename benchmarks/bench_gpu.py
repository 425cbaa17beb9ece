"""GPU benchmark of the fused reduction kernels (plugins/) against the torch reference path.

For ViT-S/B/L (timm, random weights) at batch 1 / 8 / 64, fp16, every forward captured in
a CUDA graph and timed by replays:
- one reduction step alone (fused kernel vs torch reference) as a share of one
  unreduced transformer block (goal: <= 5%);
- end to end: reduced / unreduced speed ratio for ToMe and top-k drop, with the kernels
  and with the reference, next to the FLOPs ratio (the ideal).
Writes JSON (atomically) with the machine facts. Needs a CUDA GPU and nvcc (the kernels are
built for the GPU's architecture if not already built).

    python benchmarks/bench_gpu.py --out benchmarks/results/gpu_h100.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

MODELS = {  # name -> (timm model, ToMe r per layer)
    "vit_s16": ("vit_small_patch16_224", 16),
    "vit_b16": ("vit_base_patch16_224", 16),
    "vit_l16": ("vit_large_patch16_224", 8),
}
KEEP_RATE = 0.7  # EViT's keep rate at layers 3, 6, 9


@contextmanager
def kernels_enabled(flag: bool):
    """Capture-time switch: the edgetok CUDA ops use the fused kernels or the reference."""
    from edgetok import plugins

    original = plugins._kernels_or_none
    if not flag:
        plugins._kernels_or_none = lambda: None
    try:
        yield
    finally:
        plugins._kernels_or_none = original


def graphed(fn):
    """fn captured in a CUDA graph; returns a replay callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_interleaved(replays: dict, repeats: int, inner: int) -> dict:
    """Median ms per call of each replay, variants taking turns so noise hits all alike."""
    times = {k: [] for k in replays}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for fn in replays.values():
        fn()
    torch.cuda.synchronize()
    for _ in range(repeats):
        for name, fn in replays.items():
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def step_share(model, batch: int, r: int, repeats: int, inner: int) -> dict:
    """One reduction step vs one unreduced block, on the model's first-block input size."""
    n, c = model.patch_embed.num_patches + 1, model.embed_dim
    heads = model.blocks[0].attn.num_heads
    x = torch.randn(batch, n, c, device="cuda", dtype=torch.half)
    metric = torch.randn(batch, n, c // heads, device="cuda", dtype=torch.half)
    size = torch.ones(batch, n, 1, device="cuda", dtype=torch.half)
    score = torch.rand(batch, n, device="cuda", dtype=torch.half)
    keep = int(round((n - 1) * KEEP_RATE)) + 1
    block = model.blocks[0]
    fns = {"block": graphed(lambda: block(x))}
    for label, flag in (("fused", True), ("reference", False)):
        with kernels_enabled(flag):
            fns[f"merge_{label}"] = graphed(lambda: torch.ops.edgetok.token_merge(x, metric, size, r, 1))
            fns[f"drop_{label}"] = graphed(lambda: torch.ops.edgetok.token_drop(x, score, keep, 1, 0))
    ms = time_interleaved(fns, repeats, inner)
    out = {"block_ms": ms["block"]}
    for k, v in ms.items():
        if k != "block":
            out[f"{k}_ms"] = v
            out[f"{k}_share_of_block"] = v / ms["block"]
    return out


def end_to_end(base, r: int, batch: int, repeats: int, inner: int) -> dict:
    import edgetok

    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.half)
    reduced = {"tome": edgetok.apply(base, "tome", r=r), "drop": edgetok.apply(base, "drop", keep_rate=KEEP_RATE)}
    fns = {"baseline": graphed(lambda: base(x))}
    for method, model in reduced.items():
        model = model.cuda().half().eval()
        for label, flag in (("fused", True), ("reference", False)):
            with kernels_enabled(flag):
                fns[f"{method}_{label}"] = graphed(lambda m=model: m(x))
    ms = time_interleaved(fns, repeats, inner)
    base_flops = edgetok.flops(base).total
    out = {"baseline_ms": ms["baseline"]}
    for method, model in reduced.items():
        out[f"{method}_flops_ratio"] = base_flops / edgetok.flops(model).total
        for label in ("fused", "reference"):
            out[f"{method}_{label}_ms"] = ms[f"{method}_{label}"]
            out[f"{method}_{label}_speed"] = ms["baseline"] / ms[f"{method}_{label}"]
    return out


def ensure_kernels() -> str:
    from edgetok import plugins

    path = plugins.find_library("kernels")
    if path is None:
        major, minor = torch.cuda.get_device_capability()
        path = plugins.build(archs=[f"{major}{minor}"], trt=False).libraries["kernels"]
    plugins.register_cuda_kernels()
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds per variant")
    ap.add_argument("--inner", type=int, default=20, help="graph replays per timed round")
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU (this benchmark times the fused kernels)", file=sys.stderr)
        return 1
    import timm

    from edgetok.timing import machine_facts

    torch.backends.cudnn.benchmark = True
    result = {"machine": machine_facts(), "kernels": ensure_kernels(), "dtype": "float16", "cuda_graphs": True,
              "keep_rate": KEEP_RATE, "runs": []}
    for key in args.models:
        timm_name, r = MODELS[key]
        base = timm.create_model(timm_name, pretrained=False).cuda().half().eval()
        for batch in args.batches:
            with torch.inference_mode():
                row = {"model": key, "timm": timm_name, "batch": batch, "r": r}
                row["step"] = step_share(base, batch, r, args.repeats, args.inner)
                row["end_to_end"] = end_to_end(base, r, batch, args.repeats, args.inner)
            result["runs"].append(row)
            e, s = row["end_to_end"], row["step"]
            print(f"{key} bs{batch}: base {e['baseline_ms']:.3f} ms | tome fused {e['tome_fused_speed']:.2f}x "
                  f"(ref {e['tome_reference_speed']:.2f}x, flops {e['tome_flops_ratio']:.2f}x) | drop fused "
                  f"{e['drop_fused_speed']:.2f}x (ref {e['drop_reference_speed']:.2f}x, flops "
                  f"{e['drop_flops_ratio']:.2f}x) | merge step {100 * s['merge_fused_share_of_block']:.1f}% "
                  f"of a block (ref {100 * s['merge_reference_share_of_block']:.1f}%)", flush=True)
        del base
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
