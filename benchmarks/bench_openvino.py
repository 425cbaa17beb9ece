"""OpenVINO and ONNX Runtime, unreduced and with edgetok's ToMe, and OpenVINO's own token
merging (tomeov) beside them, in one interleaved run (issue 22).

For each model (default ViT-S/16, random weights seeded with --seed) and batch size it times,
round by round in turn (edgetok.validate.timing.interleaved, so drift and other jobs hit all
alike), per-image milliseconds, median over the rounds:

- ``ov``: OpenVINO, unreduced (the export, compiled by edgetok's openvino backend code:
  edgetok/runtime/openvino.py, float32 set explicitly);
- ``ov+edgetok``: OpenVINO on edgetok's ToMe export (r per layer, clamped where a layer has
  fewer tokens, as ToMe does), bodies inlined;
- ``ort`` / ``ort+edgetok``: the same two graphs in ONNX Runtime CPU;
- ``ov+tomeov`` (with --tomeov PATH): tomeov's timm patch (openvino_contrib,
  modules/token_merging; not on PyPI) applied to the same weights and converted with
  openvino.convert_model, compiled with the same float32 hint. PATH is a checkout of that
  folder, fetched for the measurement: none of its code is in this repository and edgetok does
  not depend on it. Its tomeov/utils.py imports optimum (for its diffusers export), which its
  timm patch does not use; where optimum is missing those names are stubbed so the module loads.

Fidelity is stated next to the speed: each variant's logits against the torch model it
stands for (the reduced ones against edgetok's torch ToMe at the same r, so tomeov and edgetok
are compared at the same fidelity).

    python benchmarks/bench_openvino.py                              # ViT-S/16, batch 1 and 8, r=16
    python benchmarks/bench_openvino.py --tomeov /path/to/modules/token_merging
    python benchmarks/bench_openvino.py --tomeov PATH --profile      # + OpenVINO's time per node type
    python benchmarks/bench_openvino.py --quick                      # smoke run: ViT-Ti, 2 rounds

Not a test: numbers depend on the machine and its load; the JSON records the machine facts.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_tomeov(path: str):
    """tomeov.timm.patch_timm from a checkout of openvino_contrib/modules/token_merging."""
    import importlib

    folder = Path(path)
    if not (folder / "tomeov" / "timm.py").is_file():
        sys.exit(f"{folder} is not openvino_contrib's modules/token_merging (no tomeov/timm.py); pass that folder")
    if importlib.util.find_spec("optimum") is None:  # only its diffusers export needs these names
        for name, attrs in {"optimum": [], "optimum.exporters": [], "optimum.exporters.onnx": ["export_models"],
                            "optimum.exporters.utils": ["get_diffusion_models_for_export"],
                            "optimum.intel": ["OVStableDiffusionPipeline"],
                            "optimum.utils": [f"DIFFUSION_MODEL_{p}_SUBFOLDER" for p in
                                              ("TEXT_ENCODER", "UNET", "VAE_DECODER", "VAE_ENCODER")]}.items():
            mod = sys.modules.setdefault(name, types.ModuleType(name))
            for a in attrs:
                setattr(mod, a, None)
    sys.path.insert(0, str(folder))
    return importlib.import_module("tomeov.timm").patch_timm


def build(name: str, r: int, seed: int, batch: int, threads: int, tomeov):
    """{variant: (zero-argument runner, logits function)} and the torch references."""
    import openvino as ov
    import timm

    import edgetok
    from edgetok.export.exporter import export_onnx
    from edgetok.runtime.backends import ort_session
    from edgetok.runtime.openvino import compile_openvino

    torch.manual_seed(seed)
    base = timm.create_model(name, pretrained=False).eval()
    reduced = edgetok.apply(base, "tome", r=r, clamp=True).eval()
    shape = (3, *base.patch_embed.img_size)
    x = np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)
    run = {}
    for label, model in (("", base), ("+edgetok", reduced)):
        proto = export_onnx(model, shape)
        compiled = compile_openvino(proto, "fp32", threads)
        req = compiled.create_infer_request()
        run[f"ov{label}"] = lambda q=req, c=compiled: q.infer({"pixel_values": x})[c.output(0)]
        sess = ort_session(proto, threads=threads, interleaved=True)
        run[f"ort{label}"] = lambda s=sess: s.run(None, {"pixel_values": x})[0]
    if tomeov is not None:
        patched = copy.deepcopy(base)
        tomeov(patched, r)
        converted = ov.convert_model(patched, example_input=torch.from_numpy(x))
        compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                              "PERFORMANCE_HINT": "LATENCY",
                                                              **({"INFERENCE_NUM_THREADS": threads} if threads else {})})
        assert compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
        req = compiled.create_infer_request()
        run["ov+tomeov"] = lambda q=req, c=compiled: q.infer({c.inputs[0]: x})[c.output(0)]
    with torch.no_grad():
        refs = {"base": base(torch.from_numpy(x)).numpy(), "tome": reduced(torch.from_numpy(x)).numpy()}
    return run, refs, reduced.edgetok_plan.params["r"]


def op_profile(name: str, r: int, seed: int, batch: int, tomeov, rounds: int = 5) -> dict:
    """Where OpenVINO's time goes, per node type (PERF_COUNT), for edgetok's ToMe graph and tomeov's at
    the same r: {variant: {node type: ms per inference}}. Per-node CPU times, so a busy machine inflates
    them all; the shares are what to read."""
    import collections

    import openvino as ov
    import timm

    import edgetok
    from edgetok.export.exporter import export_onnx
    from edgetok.runtime.openvino import _read

    torch.manual_seed(seed)
    base = timm.create_model(name, pretrained=False).eval()
    shape = (3, *base.patch_embed.img_size)
    x = np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)
    core = ov.Core()
    cfg = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": "YES"}
    models = {"ov+edgetok": _read(core, export_onnx(edgetok.apply(base, "tome", r=r, clamp=True), shape))}
    if tomeov is not None:
        patched = copy.deepcopy(base)
        tomeov(patched, r)
        models["ov+tomeov"] = ov.convert_model(patched, example_input=torch.from_numpy(x))
    out = {}
    for label, model in models.items():
        compiled = core.compile_model(model, "CPU", cfg)
        req, per_type = compiled.create_infer_request(), collections.Counter()
        req.infer({compiled.inputs[0]: x})  # warm-up
        for _ in range(rounds):
            req.infer({compiled.inputs[0]: x})
            for info in req.profiling_info:
                per_type[info.node_type] += info.real_time.total_seconds() * 1e3 / rounds
        out[label] = dict(per_type.most_common())
    return out


def measure(name: str, r: int, seed: int, batch: int, repeats: int, warmup: int, threads: int, tomeov) -> dict:
    from edgetok.validate.timing import interleaved, median

    run, refs, rs = build(name, r, seed, batch, threads, tomeov)
    fidelity = {k: float(np.abs(np.asarray(fn()) - refs["base" if "+" not in k else "tome"]).max())
                for k, fn in run.items()}
    times = interleaved(run, repeats=repeats, warmup=warmup)
    per_image = {k: median(v) / batch for k, v in times.items()}
    row = {"model": name, "batch": batch, "r": r, "r_per_layer": rs, "seed": seed, "repeats": repeats,
           "per_image_ms": per_image, "max_abs_vs_torch": fidelity,
           "speedup_vs_ov": {k: per_image["ov"] / v for k, v in per_image.items()}}
    if "ov+tomeov" in per_image:
        row["edgetok_vs_tomeov"] = per_image["ov+tomeov"] / per_image["ov+edgetok"]  # > 1: edgetok faster
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit_small_patch16_224")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median over them)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0: each runtime's default (all cores)")
    p.add_argument("--tomeov", metavar="PATH", help="a checkout of openvino_contrib's modules/token_merging")
    p.add_argument("--profile", action="store_true",
                   help="also record OpenVINO's time per node type (PERF_COUNT) for edgetok's and tomeov's graphs")
    p.add_argument("--quick", action="store_true", help="smoke run: ViT-Ti, batch 1, r=8, 2 rounds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "openvino.json"))
    a = p.parse_args(argv)
    import openvino

    import edgetok
    from edgetok.runtime.artifacts import write_json
    from edgetok.validate.timing import machine_facts

    if a.quick:
        a.models, a.batches, a.r, a.repeats, a.warmup = "vit_tiny_patch16_224", "1", 8, 2, 1
    tomeov = load_tomeov(a.tomeov) if a.tomeov else None
    load_before = list(os.getloadavg())
    rows = []
    for name in a.models.split(","):
        for b in (int(v) for v in a.batches.split(",")):
            rows.append(measure(name, a.r, a.seed, b, a.repeats, a.warmup, a.threads or None, tomeov))
            if a.profile:
                rows[-1]["op_ms"] = op_profile(name, a.r, a.seed, b, tomeov)
            print(render_row(rows[-1]), flush=True)
    # other jobs on the machine move every variant alike (interleaved), but say how busy it was
    facts = machine_facts() | {"openvino": openvino.get_version(), "edgetok": edgetok.__version__,
                               "threads": a.threads or "runtime default", "load_average_before": load_before,
                               "load_average_after": list(os.getloadavg())}
    out = write_json(a.out, {"benchmark": "openvino", "machine": facts, "rows": rows}, sort_keys=False)
    print(f"wrote {out}")
    return 0


def render_row(row: dict) -> str:
    t = row["per_image_ms"]
    cells = ", ".join(f"{k} {v:.1f}" for k, v in t.items())
    extra = f"; tomeov/edgetok {row['edgetok_vs_tomeov']:.3f}" if "edgetok_vs_tomeov" in row else ""
    return f"{row['model']} batch {row['batch']} r={row['r']}: per-image ms {cells}{extra}"


if __name__ == "__main__":
    sys.exit(main())
