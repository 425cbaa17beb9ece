"""``edgetok demo``: reduce a small timm ViT and show what it buys, measured."""
from __future__ import annotations

import json

import click


@click.command()
@click.option("--model", "model_name", default="vit_small_patch16_224", show_default=True,
              help="timm model name (random weights: nothing is downloaded).")
@click.option("--r", default=8, show_default=True, help="ToMe tokens merged per layer.")
@click.option("--keep-rate", default=0.7, show_default=True, help="Top-k drop keep rate (EViT layers).")
@click.option("--batch", default=1, show_default=True, help="Batch size for the timing.")
@click.option("--repeats", default=10, show_default=True, help="Timed rounds (interleaved with the baseline).")
@click.option("--json-out", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
def demo(model_name, r, keep_rate, batch, repeats, json_out):
    """Reduce a small ViT with ToMe, top-k drop and DyMU; print per-layer token
    counts, FLOPs and the measured CPU speed ratio against the unreduced model."""
    import timm
    import torch
    from rich.console import Console
    from rich.table import Table

    import edgetok
    from ..tune.calibrate import calibrate
    from edgetok.validate.benchmark import compare
    from edgetok.validate.timing import machine_facts

    console = Console()
    torch.manual_seed(0)
    with console.status(f"building {model_name}"):
        base = timm.create_model(model_name, pretrained=False).eval()
        x = torch.randn(batch, *edgetok.patch.adapter_for(base).info(base).input_shape)
        variants = {
            f"tome r={r}": edgetok.apply(base, "tome", r=r),
            f"drop keep_rate={keep_rate}": edgetok.apply(base, "drop", keep_rate=keep_rate),
        }
        with torch.inference_mode():
            variants[f"dymu (calibrated to r={r})"] = edgetok.apply(base, "dymu", threshold=calibrate(base, x, r=r))
    with console.status(f"timing {len(variants) + 1} models, {repeats} interleaved rounds, batch {batch}"):
        rows = compare(base, variants, x, repeats=repeats)

    table = Table(title=f"{model_name}, batch {batch}, torch CPU ({torch.get_num_threads()} threads)")
    for col in ("model", "tokens in -> out", "GFLOPs", "FLOPs ratio", "p50 ms", "speed ratio"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["model"], f"{row['tokens'][0]} -> {row['tokens'][-1]}", f"{row['gflops']:.2f}",
                      f"{row['flops_ratio']:.2f}x", f"{row['p50_ms']:.1f}", f"{row['speed_ratio']:.2f}x")
    console.print(table)
    for row in rows[1:]:
        console.print(f"[dim]{row['model']} tokens per layer: {' '.join(map(str, row['tokens']))}[/dim]")
    console.print("speed ratio = baseline p50 / model p50, measured in the same run; FLOPs ratio is the ideal.")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"model": model_name, "batch": batch, "machine": machine_facts(), "rows": rows}, f, indent=2)
