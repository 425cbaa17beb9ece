"""Tail drop, Focus-DETR (DETR, Deformable-DETR), MrT5 and FlexDiT: FLOPs ratio and torch CPU speed ratio.

Tail drop runs on a timm ViT through edgetok.validate.benchmark.compare (FLOPs from
edgetok.flops). The other three are not image ViTs, so their FLOPs are counted
here from the layer shapes (multiply-add = 2, transformer layers plus the
method's own scorer/gate; embeddings, backbone, decoder and heads left out as
they do not change) and their speed ratio is timed with edgetok.validate.timing's
interleaved runner against the unreduced model in the same run, on the same
part the FLOPs count (for DETR and Deformable-DETR: the encoder alone, on the
backbone features of one 800x1216 image). Random
weights throughout. Writes benchmarks/results/methods_other.json.

    .venv/bin/python benchmarks/bench_methods_other.py            # real sizes, quiet machine
    .venv/bin/python benchmarks/bench_methods_other.py --tiny     # smoke run
"""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch

import edgetok
from edgetok.validate.benchmark import compare
from edgetok.patch.hf_detr import detr_encoder
from edgetok.patch.dit import at_factor, flexdit as flexdit_model
from edgetok.patch.focus_detr import focus_detr as focus_detr_model
from edgetok.patch.hf_t5 import mrt5 as mrt5_model
from edgetok.reduce import focus_detr
from edgetok.runtime.artifacts import write_json
from edgetok.validate.timing import interleaved, machine_facts, summary


def timed_rows(arch: str, base_fn, variants: dict, flops_base: float, repeats: int, batch: int) -> list[dict]:
    """variants: name -> (callable, flops); one row each, baseline first."""
    fns = {"baseline": base_fn, **{k: v[0] for k, v in variants.items()}}
    with torch.inference_mode():
        times = interleaved(fns, repeats=repeats, warmup=2)
    base_ms = summary(times["baseline"])["p50_ms"]
    rows = []
    for name, fl in [("baseline", flops_base)] + [(k, v[1]) for k, v in variants.items()]:
        lat = summary(times[name])
        speed, ratio = base_ms / lat["p50_ms"], flops_base / fl
        rows.append({"arch": arch, "model": name, "batch": batch, "gflops": fl / 1e9, "flops_ratio": ratio,
                     "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "speed_ratio": speed,
                     "share_of_ideal": speed / ratio})
    return rows


def detr_encoder_flops(n: int, d: int, ffn: int, layers: int, keeps=None, scorer: bool = False) -> float:
    total = 2 * n * (d * d + d) if scorer else 0
    for i in range(layers):
        k = n if keeps is None else keeps[i]
        total += 2 * (2 * k * d * d + 2 * n * d * d) + 2 * 2 * k * n * d + 2 * 2 * k * d * ffn
    return total


def deformable_encoder_flops(n: int, d: int, ffn: int, layers: int, heads: int, levels: int, points: int,
                             keeps=None, scorer: bool = False) -> float:
    """Deformable-DETR encoder: value projection of all ``n`` tokens; per query the sampling
    offsets, attention weights, bilinear sampling (4 taps) + weighted sum, output projection, FFN."""
    total = 2 * n * (d * d + d) if scorer else 0
    samples = heads * levels * points
    for i in range(layers):
        k = n if keeps is None else keeps[i]
        total += 2 * n * d * d + 2 * k * d * (3 * samples) + k * samples * (d // heads) * 10 \
            + 2 * k * d * d + 2 * 2 * k * d * ffn
    return total


def t5_layer_flops(n: int, d: int, inner: int, ff: int, gated: bool) -> float:
    return 2 * n * d * inner * 4 + 2 * 2 * n * n * inner + 2 * n * d * ff * (3 if gated else 2)


def dit_block_flops(n: int, d: int, mlp_ratio: float = 4.0) -> float:
    return 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * int(d * mlp_ratio) + 2 * 6 * d * d


def bench_tail_drop(tiny: bool, repeats: int) -> list[dict]:
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2) if tiny else {}
    base = timm.create_model("vit_small_patch16_224", pretrained=False, **kw).eval()
    n = edgetok.flops(base).tokens[0]
    x = torch.randn(1, 3, *base.patch_embed.img_size)
    depth = len(base.blocks)
    variants = {f"tail_drop keep={k} layer={depth // 2}": edgetok.apply(base, "tail_drop", keep=k, layer=depth // 2)
                for k in sorted({max(2, n // 4), max(2, n // 2)})}
    rows = compare(base, variants, x, repeats=repeats)
    for r in rows:
        r["arch"] = "timm vit_small" + (" (tiny)" if tiny else "")
        r.pop("tokens", None)
    return rows


def bench_focus_detr(tiny: bool, repeats: int) -> list[dict]:
    from transformers import DetrConfig, DetrModel, ResNetConfig

    d, layers, ffn = (32, 2, 64) if tiny else (256, 6, 2048)
    bb = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                      out_features=["stage2"]) if tiny else ResNetConfig(out_features=["stage4"])
    cfg = DetrConfig(backbone_config=bb, use_timm_backbone=False, use_pretrained_backbone=False, d_model=d,
                     encoder_layers=layers, decoder_layers=1 if tiny else 6, encoder_ffn_dim=ffn)
    base = DetrModel(cfg).eval()
    x = torch.randn(1, 3, *((64, 96) if tiny else (800, 1216)))
    # Time the encoder alone (what Focus-DETR changes and what the FLOPs count): its inputs are the
    # backbone's projected features, position embeddings and mask, captured once from a full forward.
    enc_in: dict = {}
    hook = detr_encoder(base).register_forward_pre_hook(lambda m, a, kw: enc_in.update(kw), with_kwargs=True)
    with torch.inference_mode():
        base(pixel_values=x)
    hook.remove()
    n = enc_in["inputs_embeds"].shape[1]
    variants = {}
    for rate in (0.3, 0.5):
        red = detr_encoder(focus_detr_model(base, keep_rate=rate))
        keeps = [focus_detr.keep_count(n, rate)] * layers
        variants[f"focus_detr keep_rate={rate}"] = ((lambda e=red: e(**enc_in)),
                                                    detr_encoder_flops(n, d, ffn, layers, keeps, scorer=True))
    arch = f"HF DetrModel encoder ({n} tokens)"
    base_enc = detr_encoder(base)
    return timed_rows(arch, lambda: base_enc(**enc_in), variants, detr_encoder_flops(n, d, ffn, layers),
                      repeats, 1)


def bench_focus_deformable_detr(tiny: bool, repeats: int) -> list[dict]:
    from transformers import DeformableDetrConfig, DeformableDetrModel, ResNetConfig

    from edgetok.patch.hf_deformable_detr import deformable_detr_encoder

    if tiny:
        d, layers, ffn, levels, heads, points = 32, 2, 64, 3, 2, 2
        bb = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 1, 1], layer_type="basic",
                          out_features=["stage1", "stage2", "stage3"])
    else:  # Deformable-DETR R50 4-scale shape (the paper's setting)
        d, layers, ffn, levels, heads, points = 256, 6, 1024, 4, 8, 4
        bb = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
    cfg = DeformableDetrConfig(backbone_config=bb, use_timm_backbone=False, use_pretrained_backbone=False,
                               d_model=d, encoder_layers=layers, decoder_layers=1, encoder_ffn_dim=ffn,
                               num_feature_levels=levels, encoder_attention_heads=heads, encoder_n_points=points)
    base = DeformableDetrModel(cfg).eval()
    x = torch.randn(1, 3, *((64, 96) if tiny else (800, 1216)))
    enc_in: dict = {}
    hook = deformable_detr_encoder(base).register_forward_pre_hook(lambda m, a, kw: enc_in.update(kw),
                                                                   with_kwargs=True)
    with torch.inference_mode():
        base(pixel_values=x)
    hook.remove()
    n = enc_in["inputs_embeds"].shape[1]
    shape = (n, d, ffn, layers, heads, levels, points)
    variants = {}
    for rates in ((0.3,), (0.5, 0.4, 0.3, 0.3, 0.2, 0.1)[:layers]):
        red = deformable_detr_encoder(focus_detr_model(base, keep_rate=rates[0] if len(rates) == 1 else list(rates)))
        keeps = [focus_detr.keep_count(n, r) for r in red.edgetok_plan.params["keep_rate"]]
        name = "focus_detr keep_rate=" + ",".join(str(r) for r in rates)
        variants[name] = ((lambda e=red: e(**enc_in)), deformable_encoder_flops(*shape, keeps, scorer=True))
    base_enc = deformable_detr_encoder(base)
    return timed_rows(f"HF DeformableDetrModel encoder ({n} tokens, {levels} levels)", lambda: base_enc(**enc_in),
                      variants, deformable_encoder_flops(*shape), repeats, 1)


def bench_mrt5(tiny: bool, repeats: int) -> list[dict]:
    from transformers import T5Config, T5EncoderModel

    if tiny:
        cfg = T5Config(vocab_size=259, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4, dropout_rate=0.0,
                       feed_forward_proj="gated-gelu")
        n, layer = 64, 1
    else:  # ByT5-small encoder shape
        cfg = T5Config(vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6,
                       dropout_rate=0.0, feed_forward_proj="gated-gelu")
        n, layer = 1024, 2
    base = T5EncoderModel(cfg).eval()
    ids = torch.randint(3, 259, (1, n))
    inner, gated = cfg.num_heads * cfg.d_kv, True
    per = [t5_layer_flops(n, cfg.d_model, inner, cfg.d_ff, gated)] * cfg.num_layers
    variants = {}
    for max_keep in (n // 4, n // 2):
        red = mrt5_model(base, layer=layer, max_keep=max_keep)
        fl = sum(per[: layer + 1]) + 2 * n * cfg.d_model + sum(
            t5_layer_flops(max_keep, cfg.d_model, inner, cfg.d_ff, gated) for _ in range(layer + 1, cfg.num_layers))
        variants[f"mrt5 layer={layer} max_keep={max_keep}"] = ((lambda m=red: m(input_ids=ids)), fl)
    arch = f"HF T5EncoderModel ({'tiny' if tiny else 'ByT5-small shape'}, {n} bytes)"
    return timed_rows(arch, lambda: base(input_ids=ids), variants, sum(per), repeats, 1)


def bench_flexdit(tiny: bool, repeats: int) -> list[dict]:
    from edgetok.patch.dit import DiT

    kw = dict(input_size=8, patch_size=2, hidden=32, depth=4, heads=2) if tiny else \
        dict(input_size=32, patch_size=2, hidden=384, depth=12, heads=6)  # DiT-S/2 at 256px
    base = DiT(**kw).eval()
    g, d, depth = base.grid, kw["hidden"], kw["depth"]
    x, y = torch.randn(1, 4, kw["input_size"], kw["input_size"]), torch.tensor([1])
    t = torch.tensor([999])
    red = flexdit_model(base)
    start, end = red.edgetok_plan.params["sparse_layers"]
    variants = {}
    for f in (2, 4) if g % 4 == 0 else (2,):
        fixed = at_factor(red, f)
        fl = sum(dit_block_flops((g // f) ** 2 if start <= i < end else g * g, d) for i in range(depth))
        variants[f"flexdit factor={f} sparse_layers=({start},{end})"] = ((lambda m=fixed: m(x, t, y)), fl)
    arch = f"DiT ({'tiny' if tiny else 'DiT-S/2 shape'}, {g * g} tokens)"
    return timed_rows(arch, lambda: base(x, t, y), variants, depth * dit_block_flops(g * g, d), repeats, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny models, few repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods_other.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    repeats = 3 if args.tiny else args.repeats
    rows = []
    for bench in (bench_tail_drop, bench_focus_detr, bench_focus_deformable_detr, bench_mrt5, bench_flexdit):
        for row in bench(args.tiny, repeats):
            print(f"{row['arch'][:40]:40s} {row['model'][:40]:40s} flops {row['flops_ratio']:.2f}x "
                  f"speed {row['speed_ratio']:.2f}x  p50 {row['p50_ms']:.2f} ms", flush=True)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "methods_other", "tiny": args.tiny, "machine": machine_facts(),
               "edgetok": edgetok.__version__, "rows": rows}
    write_json(out, payload, sort_keys=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
