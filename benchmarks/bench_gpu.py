"""GPU check and benchmark of the fused reduction kernels (plugins/): one command, about 4 minutes.

On a CUDA GPU (fp16 timing, random-weight timm models, every variant captured in a CUDA graph
and timed by replays, variants interleaved):
1. checks: token_merge, token_drop and threshold_merge kernels against their torch references
   at N = 197, 577, 1025, 4097 and 6001 (the last two put the drop and merge plans in the
   workspace instead of shared memory), float32 and float16, batch 3, with exact score ties:
   decisions (sizes, kept indices, counts) must be identical, values within tolerance;
2. step: one reduction step alone (fused kernels and the torch reference) against one
   unreduced block, on that block's input, for ViT-B/16 and ViT-L/16 at N = 197, 577, 1025
   (224, 384, 512 px) and batch 1 and 16;
3. model: the same models end to end with ToMe and top-k drop, kernels and reference, against
   the unreduced model, the FLOPs ratio (the ideal) beside.
The JSON is rewritten after every configuration, so a run cut short keeps what it measured;
--budget-s stops starting new configurations when the time is spent (they are listed as skipped).

    PYTHONPATH=. python3 benchmarks/bench_gpu.py --out benchmarks/results/gpu_h100.json
    python benchmarks/bench_gpu.py --dry-run   # any machine: configurations, shapes, check code path

--dry-run needs no GPU: it lists the configurations, checks each model's token count at each
input size (models built on the meta device) and runs the checks' code on the CPU, where the
CUDA implementations fall back to the references.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from edgetok.runtime.artifacts import write_json

MODELS = {  # name -> (timm model, ToMe r per layer at 197 tokens; scaled with the token count)
    "vit_b16": ("vit_base_patch16_224", 16),
    "vit_l16": ("vit_large_patch16_224", 8),
}
IMG_SIZE = {197: 224, 577: 384, 1025: 512}  # tokens (patch 16 + class token) -> input size
KEEP_RATE = 0.7  # top-k drop: EViT's keep rate
CHECK_TOKENS = (197, 577, 1025, 4097, 6001)
TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def tome_r(r197: int, n: int) -> int:
    """ToMe's r scaled with the token count (the same share of tokens per layer as r197 at 197)."""
    return max(1, round(r197 * (n - 1) / 196))


# --- 1. kernels against the references -------------------------------------------------------


def tie_metric(gen, b, n, ck, pool=6):
    """Rows from a few vectors with entries in {-1, 0, 1} and 1, 4 or 16 non-zeros: every cosine
    score is a multiple of 1/16, exact in fp32 and fp16, so ties are exact ties everywhere."""
    vecs = torch.zeros(pool, ck)
    for p in range(pool):
        nnz = (1, 4, 16)[p % 3]
        pos = torch.randperm(ck, generator=gen)[:nnz]
        vecs[p, pos] = torch.randint(0, 2, (nnz,), generator=gen).float() * 2 - 1
    return vecs[torch.randint(0, pool, (b, n), generator=gen)]


def check_kernels(device: str, dtypes, tokens=CHECK_TOKENS, batch=3, channels=64) -> list:
    """Each op at each token count and dtype: decisions identical, values within TOL."""
    from edgetok.ops import plugins
    from edgetok.reduce.drop import top_k_drop
    from edgetok.reduce.dymu import threshold_merge
    from edgetok.reduce.tome import bipartite_merge, max_merges

    rows = []
    for n in tokens:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(batch, n, channels, generator=g)
        metric = tie_metric(g, batch, n, 64)
        size = torch.randint(1, 4, (batch, n, 1), generator=g).float()
        padded = size.clone()
        for i in range(batch):
            padded[i, int(torch.randint(n // 2, n + 1, (1,), generator=g)):] = 0
        score = torch.randint(0, 5, (batch, n), generator=g).float() / 5
        r, keep = max_merges(n, 1) // 2, max(1, int(KEEP_RATE * n))
        for dtype in dtypes:
            dev = lambda *ts: [t.to(device, dtype) for t in ts]  # noqa: E731
            ref = lambda *ts: [t.to(dtype).float() for t in ts]  # noqa: E731 (the values the kernel sees)
            want, want_size = bipartite_merge(*ref(x, metric, size), r, 1)
            got, got_size = plugins.cuda_token_merge(*dev(x, metric, size), r, 1)
            rows.append(_check_row("token_merge", n, dtype, torch.equal(got_size.float().cpu(), want_size),
                                   got, want))
            want, want_idx = top_k_drop(*ref(x, score), keep, 1, True)
            got, idx = plugins.cuda_token_drop(*dev(x, score), keep, 1, 1)
            rows.append(_check_row("token_drop", n, dtype, torch.equal(idx.cpu(), want_idx), got, want))
            want, want_size, want_count = threshold_merge(*ref(x, metric, padded), 0.5 / 16, 1)
            got, got_size, count = plugins.cuda_threshold_merge(*dev(x, metric, padded), 0.5 / 16, 1)
            same = torch.equal(count.cpu(), want_count) and torch.equal(got_size.float().cpu(), want_size)
            rows.append(_check_row("threshold_merge", n, dtype, same, got, want))
    return rows


def _check_row(op, n, dtype, decisions_equal, got, want) -> dict:
    if got.shape != want.shape:
        err = float("inf")
    else:
        err = (got.float().cpu() - want).abs().max().item() if want.numel() else 0.0
    tol = TOL[dtype]
    return {"op": op, "n": n, "dtype": str(dtype).replace("torch.", ""), "decisions_equal": bool(decisions_equal),
            "max_abs_err": err, "tol": tol, "ok": bool(decisions_equal) and err <= tol}


# --- 2. and 3. timing --------------------------------------------------------------------------


@contextmanager
def kernels_enabled(flag: bool):
    """Capture-time switch: the edgetok CUDA ops use the fused kernels or the reference."""
    from edgetok.ops import plugins

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


def step_vs_block(model, batch: int, r: int, repeats: int, inner: int) -> dict:
    """One reduction step (fused, reference) against one unreduced block, on its input shape."""
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
    out = {"block_ms": ms["block"], "keep": keep}
    for k, v in ms.items():
        if k != "block":
            out[f"{k}_ms"] = v
            out[f"{k}_share_of_block"] = v / ms["block"]
    return out


def model_vs_unreduced(base, r: int, batch: int, img: int, repeats: int, inner: int) -> dict:
    import edgetok

    x = torch.randn(batch, 3, img, img, device="cuda", dtype=torch.half)
    reduced = {"tome": edgetok.apply(base, "tome", r=r, clamp=True),
               "drop": edgetok.apply(base, "drop", keep_rate=KEEP_RATE)}
    fns = {"baseline": graphed(lambda: base(x))}
    for method, model in reduced.items():
        model = model.cuda().half().eval()
        for label, flag in (("fused", True), ("reference", False)):
            with kernels_enabled(flag):
                fns[f"{method}_{label}"] = graphed(lambda m=model: m(x))
    ms = time_interleaved(fns, repeats, inner)
    base_flops = edgetok.flops(base).total
    out = {"baseline_ms": ms["baseline"], "tome_r": reduced["tome"].edgetok_plan.params["r"]}
    for method, model in reduced.items():
        out[f"{method}_flops_ratio"] = base_flops / edgetok.flops(model).total
        for label in ("fused", "reference"):
            out[f"{method}_{label}_ms"] = ms[f"{method}_{label}"]
            out[f"{method}_{label}_speed"] = ms["baseline"] / ms[f"{method}_{label}"]
    return out


# --- driver ----------------------------------------------------------------------------------


def configurations(models, tokens, batches) -> list:
    return [(m, n, b) for m in models for n in tokens for b in batches]


def create_model(key: str, n: int, device: str):
    import timm

    name, _ = MODELS[key]
    with torch.device(device):
        model = timm.create_model(name, pretrained=False, img_size=IMG_SIZE[n])
    if model.patch_embed.num_patches + 1 != n:
        raise SystemExit(f"{name} at {IMG_SIZE[n]} px has {model.patch_embed.num_patches + 1} tokens, not {n}")
    return model


def ensure_kernels() -> str:
    from edgetok.ops import plugins

    path = plugins.find_library("kernels")
    if path is None:
        major, minor = torch.cuda.get_device_capability()
        path = plugins.build(archs=[f"{major}{minor}"], trt=False).libraries["kernels"]
    plugins.load_kernels(Path(path))  # fails here, naming the fix, if it is stale or does not load
    plugins.register_cuda_kernels()
    if plugins._kernels_or_none() is None:
        raise SystemExit(f"built {path} but edgetok does not load it: set EDGETOK_PLUGIN_DIR to its folder")
    return str(path)


def dry_run(args) -> int:
    """No GPU: what a run would do, the models' token counts, and the checks' code on the CPU."""
    configs = configurations(args.models, args.tokens, args.batches)
    for key, n, batch in configs:
        model = create_model(key, n, "meta")
        print(f"{key} N={n} ({IMG_SIZE[n]} px, C={model.embed_dim}, {len(model.blocks)} blocks) batch {batch}: "
              f"ToMe r={tome_r(MODELS[key][1], n)}, drop keep_rate={KEEP_RATE}")
    with kernels_enabled(False):  # CPU tensors: the CUDA implementations' reference fallback
        rows = check_kernels("cpu", [torch.float32], tokens=(5, 33), batch=2, channels=4)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(configs)} timing configurations; checks at N={list(CHECK_TOKENS)}; "
          f"check code path on CPU: {len(rows) - len(bad)}/{len(rows)} ok")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--tokens", nargs="+", type=int, default=list(IMG_SIZE), choices=list(IMG_SIZE))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--repeats", type=int, default=10, help="interleaved rounds per variant")
    ap.add_argument("--inner", type=int, default=10, help="graph replays per timed round")
    ap.add_argument("--budget-s", type=float, default=270, help="start no new configuration after this many seconds")
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--dry-run", action="store_true", help="no GPU needed: list configurations, run the checks' code")
    args = ap.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU (this benchmark times the fused kernels); --dry-run runs without one",
              file=sys.stderr)
        return 1
    from edgetok.validate.timing import machine_facts

    t0 = time.monotonic()
    out = Path(args.out)
    result = {"machine": machine_facts(), "gpu": torch.cuda.get_device_name(0), "kernels": ensure_kernels(),
              "dtype": "float16", "cuda_graphs": True, "keep_rate": KEEP_RATE, "checks": [], "runs": [],
              "skipped": []}
    result["checks"] = check_kernels("cuda", [torch.float32, torch.float16])
    failed = [c for c in result["checks"] if not c["ok"]]
    for c in failed:
        print(f"CHECK FAILED: {c}", flush=True)
    print(f"checks: {len(result['checks']) - len(failed)}/{len(result['checks'])} ok "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    write_json(out, result, sort_keys=False)
    torch.backends.cudnn.benchmark = True
    models = {}
    for key, n, batch in configurations(args.models, args.tokens, args.batches):
        if time.monotonic() - t0 > args.budget_s:
            result["skipped"].append({"model": key, "n": n, "batch": batch, "why": "time budget"})
            continue
        if (key, n) not in models:
            models.clear()
            torch.cuda.empty_cache()
            models[(key, n)] = create_model(key, n, "cuda").half().eval()
        base = models[(key, n)]
        r = tome_r(MODELS[key][1], n)
        with torch.inference_mode():
            row = {"model": key, "timm": MODELS[key][0], "n": n, "img_size": IMG_SIZE[n], "batch": batch, "r": r,
                   "step": step_vs_block(base, batch, r, args.repeats, args.inner),
                   "model_end_to_end": model_vs_unreduced(base, r, batch, IMG_SIZE[n], args.repeats, args.inner)}
        result["runs"].append(row)
        write_json(out, result, sort_keys=False)
        s, e = row["step"], row["model_end_to_end"]
        print(f"{key} N={n} bs{batch} ({time.monotonic() - t0:.0f} s): block {s['block_ms']:.3f} ms, merge step "
              f"{100 * s['merge_fused_share_of_block']:.1f}% of it (ref {100 * s['merge_reference_share_of_block']:.1f}%)"
              f", drop step {100 * s['drop_fused_share_of_block']:.1f}% | model {e['baseline_ms']:.2f} ms, ToMe "
              f"{e['tome_fused_speed']:.2f}x (ref {e['tome_reference_speed']:.2f}x, FLOPs {e['tome_flops_ratio']:.2f}x)"
              f", drop {e['drop_fused_speed']:.2f}x (ref {e['drop_reference_speed']:.2f}x, FLOPs "
              f"{e['drop_flops_ratio']:.2f}x)", flush=True)
    result["seconds"] = time.monotonic() - t0
    write_json(out, result, sort_keys=False)
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
