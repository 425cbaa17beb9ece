"""Torch CPU: FLOPs ratio and measured speed ratio of the ViT/VLM token methods.

DivPrune, HiRED, Zero-TPrune, DiffRate, Self-slimmed ViT (random slimming
layers), MustDrop and ToMe/top-k for reference, each on a random-weight timm
ViT, interleaved with the unreduced model in the same run
(edgetok.validate.benchmark.compare). The VLM output stage is timed as the tower with
and without the selection of ``--budget`` tokens (the same encoder work: its
cost is the selection, its saving is in the language model, so the row
reports the token ratio handed on). Writes JSON to
benchmarks/results/methods.json. Keep other heavy jobs off the machine.

    .venv/bin/python benchmarks/bench_methods.py [--model vit_small_patch16_224] [--batches 1,32] [--repeats 10]
    smoke run: --model vit_tiny_patch16_224 --img-size 64 --depth 4 --batches 1 --repeats 2
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

import edgetok
from edgetok.validate.benchmark import compare
from edgetok.runtime.artifacts import write_json
from edgetok.validate.timing import interleaved, machine_facts, summary


def variants(base, depth: int, tokens: int, dim: int) -> dict:
    """One setting per method at comparable reduction (about 30-50% of the tokens by the end)."""
    third = [i for i in range(depth) if i % 3 == 0 and 0 < i < depth - 1] or [depth // 2]
    r = max(1, tokens // (2 * depth))
    settings = {
        f"tome r={r}": ("tome", dict(r=r)),
        "drop keep_rate=0.7": ("drop", dict(keep_rate=0.7, layers=third)),
        "divprune keep_rate=0.7": ("divprune", dict(keep_rate=0.7, layers=third)),
        "hired keep_rate=0.5": ("hired", dict(keep_rate=0.5, layer=depth // 3)),
        f"zero_tprune r={r // 2}+{r - r // 2}": ("zero_tprune", dict(r_importance=r // 2, r_similarity=r - r // 2)),
        f"diffrate r={r}": ("diffrate", dict(r=r)),
        "slim keep_rate=0.5": ("slim", dict(keep_rate=0.5, layers=[depth // 3], dim=dim)),
        "mustdrop": ("mustdrop", dict(merge_r=(tokens - 1) // 4, keep_rate=0.7, drop_layers=[depth // 2])),
    }
    out = {}
    for name, (method, params) in settings.items():
        try:
            out[name] = edgetok.apply(base, method, **params)
        except edgetok.EdgetokError as e:
            print(f"skipping {name}: {e}", flush=True)
    return out


def vlm_rows(base, x, budget: int, repeats: int) -> list[dict]:
    rows = []
    towers = {s: edgetok.apply(base, "vlm_output", budget=budget, scorer=s)
              for s in ("cls_attn", "divprune", "hired", "zero_tprune")}
    with torch.inference_mode():
        times = interleaved({"tower": lambda: base.forward_features(x),
                             **{s: (lambda t=t: t(x)) for s, t in towers.items()}}, repeats=repeats)
    base_ms = summary(times["tower"])["p50_ms"]
    patches = base.patch_embed.num_patches
    for s in towers:
        p50 = summary(times[s])["p50_ms"]
        rows.append({"model": f"vlm_output {s} budget={budget}", "method": "vlm_output", "batch": int(x.shape[0]),
                     "tokens_handed_on": budget, "token_ratio": patches / budget, "p50_ms": p50,
                     "tower_p50_ms": base_ms, "selection_overhead": p50 / base_ms - 1.0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget", type=int, default=64, help="tokens the VLM output stage hands on")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    kw = {k: v for k, v in (("img_size", args.img_size), ("depth", args.depth)) if v is not None}
    base = timm.create_model(args.model, pretrained=False, **kw).eval()
    info = edgetok.patch.adapter_for(base).info(base)
    models = variants(base, info.depth, info.tokens, info.dim)
    results = []
    for batch in map(int, args.batches.split(",")):
        x = torch.randn(batch, *info.input_shape)
        repeats = args.repeats if batch < 16 else max(2, args.repeats // 3)
        rows = compare(base, models, x, repeats=repeats)
        for row in rows:
            row["arch"] = args.model
            print(f"{args.model} bs{batch:<3d} {row['model']:28s} flops {row['flops_ratio']:.2f}x "
                  f"speed {row['speed_ratio']:.2f}x  p50 {row['p50_ms']:.2f} ms", flush=True)
        results.extend(rows)
        for row in vlm_rows(base, x, min(args.budget, info.tokens - info.num_prefix), repeats):
            row["arch"] = args.model
            print(f"{args.model} bs{batch:<3d} {row['model']:28s} tokens {row['token_ratio']:.2f}x fewer, "
                  f"selection {100 * row['selection_overhead']:+.1f}% vs the tower", flush=True)
            results.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "methods_torch_cpu", "machine": machine_facts(), "edgetok": edgetok.__version__,
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": results}
    write_json(out, payload, sort_keys=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
