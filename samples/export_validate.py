"""End to end from the command line's point of view: export a reduced ViT and
its unreduced baseline, then `edgetok validate` both in one run against a
latency budget (exit code 1 when p99 misses it).

    python samples/export_validate.py [--budget-ms 50] [--out out/sample]
"""
import argparse
import sys
from pathlib import Path

import timm
import torch

import edgetok
from edgetok.cli import main as cli
from edgetok.export import export_model


def run(out: Path, budget_ms: float) -> int:
    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    export_model(base, out / "base")
    export_model(edgetok.apply(base, "tome", r=8), out / "tome")
    torch.save(edgetok.apply(base, "tome", r=8), out / "tome" / "model.pt")  # enables the parity check
    return cli(["validate", str(out / "tome"), "--baseline", str(out / "base"), "--budget-ms", str(budget_ms),
                "--runs", "30", "--report", str(out / "validate.json")])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-ms", type=float, default=50.0)
    ap.add_argument("--out", type=Path, default=Path("out/sample"))
    a = ap.parse_args()
    sys.exit(run(a.out, a.budget_ms))
