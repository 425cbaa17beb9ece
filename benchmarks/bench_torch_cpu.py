"""Torch CPU: measured speed ratio of each method next to its FLOPs ratio.

vit_small and vit_base (random weights), batch 1 and 32, tome / drop / dymu,
interleaved with the unreduced model in the same run. Writes JSON to
benchmarks/results/torch_cpu.json. Keep other heavy jobs off the machine.

    .venv/bin/python benchmarks/bench_torch_cpu.py [--repeats 10] [--batches 1,32]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

import edgetok
from edgetok.validate.benchmark import compare
from edgetok.tune.calibrate import calibrate
from edgetok.runtime.artifacts import write_json
from edgetok.validate.timing import machine_facts

MODELS = {"vit_small_patch16_224": 8, "vit_base_patch16_224": 16}  # ToMe r per model (the paper's settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "torch_cpu.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for name in args.models.split(","):
        base = timm.create_model(name, pretrained=False).eval()
        r = MODELS.get(name, 8)
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, 3, 224, 224)
            with torch.inference_mode():
                thresholds = calibrate(base, x[:8], r=r, clamp=True)
            variants = {
                f"tome r={r}": edgetok.apply(base, "tome", r=r, clamp=True),
                "drop keep_rate=0.7": edgetok.apply(base, "drop", keep_rate=0.7),
                f"dymu (calibrated to r={r})": edgetok.apply(base, "dymu", threshold=thresholds),
            }
            rows = compare(base, variants, x, repeats=args.repeats if batch < 16 else max(3, args.repeats // 3))
            for row in rows:
                row["arch"] = name
                print(f"{name:24s} bs{batch:<3d} {row['model']:26s} flops {row['flops_ratio']:.2f}x "
                      f"speed {row['speed_ratio']:.2f}x  p50 {row['p50_ms']:.1f} ms", flush=True)
            results.extend(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "torch_cpu", "machine": machine_facts(), "edgetok": edgetok.__version__, "rows": results}
    write_json(out, payload, sort_keys=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
