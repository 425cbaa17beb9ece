"""``edgetok tune``: the fastest per-layer schedule on the target that keeps a budget on your images
(edgetok/tune/budget.py: DiffRate-style greedy over measured costs, arXiv:2305.17997).

    edgetok tune --model vit_small_patch16_224 --weights vit-s.safetensors --target cpu-ort \\
        --images photos/ --min-cosine 0.995,0.95 -o out/tune
    edgetok tune --model-config model.json --weights vit.pt --target cpu-ort \\
        --images cifar10_train5000.npz --max-top1-drop 0.5 -o out/tune-cifar
    edgetok export --model vit_small_patch16_224 --weights vit-s.safetensors --r @out/tune/schedule.json \\
        --target cpu-ort -o out/vit-s-tuned

Writes DIR/schedule.json (what ``edgetok export --r @FILE`` reads), DIR/tune_report.json and
DIR/pareto.png.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
import torch

from ..tune.budget import TuneError


@click.command(context_settings={"max_content_width": 110})
@click.option("--model", "model_name", metavar="NAME",
              help="Any name `edgetok export --model` takes (timm, tv:NAME, hf:Class, a save_pretrained folder).")
@click.option("--model-config", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="Instead of --model: a model.json (timm architecture + normalize, as ../shared/data/cifar10-vit).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="Model constructor argument.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), metavar="FILE", help="Local checkpoint.")
@click.option("--seed", default=0, show_default=True, help="Random-weight seed (without --weights); split seed.")
@click.option("--images", "source", required=True, type=click.Path(exists=True), metavar="DIR|NPZ",
              help="Calibration images: a folder, or an .npz with 'images' and optional integer 'labels'. "
                   "Half searches, the other half verifies.")
@click.option("--target", required=True, metavar="CONFIG", help="Export config the schedule is for (e.g. cpu-ort).")
@click.option("--backend", metavar="NAME", help="Measure costs on this backend instead of the config's "
                                                 "(torch-cpu, torch-cuda, ort-cpu, ort-cuda).")
@click.option("--batch", type=click.IntRange(min=1), help="Batch the costs are measured at (default: config opt).")
@click.option("--min-speedup", type=float, metavar="X", help="Budget: at least X times faster than unreduced.")
@click.option("--budget-ms", type=float, metavar="Y", help="Budget: at most Y ms per batch on the target.")
@click.option("--min-cosine", metavar="MEAN[,WORST]",
              help="Budget: feature cosine to the unreduced model, mean (and worst image) at least this.")
@click.option("--max-top1-drop", type=float, metavar="PTS", help="Budget: top-1 lost, in points (needs labels).")
@click.option("--method", "methods", default="tome", show_default=True, metavar="NAME[,NAME]",
              help="Methods with a per-layer r to search (tome, diffrate: prune-then-merge); the best is kept.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Method parameter (prop_attn=false).")
@click.option("--feature", type=click.Choice(["pooled", "cls"]), default="pooled", show_default=True,
              help="Feature whose cosine is measured: pooled patch tokens or the class token.")
@click.option("--step", type=click.IntRange(min=1), help="Tokens added per greedy move (default tokens/32).")
@click.option("--search-images", type=click.IntRange(min=1), metavar="N",
              help="Search on only N images of the search half (faster; the verification half stays whole).")
@click.option("--repeats", default=10, show_default=True, help="Timing rounds per cost-table entry.")
@click.option("--threads", type=click.IntRange(min=1), help="torch threads (1 is fastest on a busy CPU).")
@click.option("--cost-cache", type=click.Path(file_okay=False), metavar="DIR", help="Cost-table cache directory.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Writes schedule.json, tune_report.json, pareto.png here.")
def tune(model_name, model_config, model_args, weights, seed, source, target, backend, batch, min_speedup, budget_ms,
         min_cosine, max_top1_drop, methods, params, feature, step, search_images, repeats, threads, cost_cache,
         output):
    """The fastest per-layer schedule on TARGET that keeps one budget on your images."""
    from ..config import load_config
    from ..runtime.artifacts import write_json
    from ..tune.budget import make_budget, plot, schedule_record
    from ..tune.budget import tune as run_tune
    from .export import _key_values

    if (model_name is None) == (model_config is None):
        raise TuneError("give exactly one of --model NAME or --model-config FILE")
    has_labels = _has_labels(source)
    budget = make_budget(min_speedup, budget_ms, min_cosine, max_top1_drop, labels=has_labels)
    config = load_config(target)
    backend, batch = _backend(config, backend), batch or config.batch.opt
    if threads:
        torch.set_num_threads(threads)
    model, spec = _model(model_name, model_config, weights, _key_values(model_args, "--model-arg"), seed)
    images, labels = load_images(source, model, spec)
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    method_params = _key_values(params, "--param")
    click.echo(f"tuning {model_name or model_config} for {config.name} ({backend}, batch {batch}) on "
               f"{len(images)} images, budget: {budget.describe()}", err=True)
    out, rep = run_tune(model, images, budget, labels, backend, batch, method_list, method_params, step, feature,
                        search_images, repeats, cost_cache, seed=seed)
    rep |= {"model": model_name or model_config, "target": config.name, "images_source": str(source)}
    folder = Path(output)
    write_json(folder / "schedule.json", schedule_record(out, method_params))
    write_json(folder / "tune_report.json", rep)
    plot(rep, folder / "pareto.png")
    _summary(rep, folder)
    return 0


def _has_labels(source) -> bool:
    import numpy as np

    path = Path(source)
    if path.is_dir() or path.suffix != ".npz":
        return False
    with np.load(path, allow_pickle=False) as d:
        return "labels" in d.files


def _backend(config, backend: Optional[str]) -> str:
    from ..tune.auto import BACKENDS
    from ..tune.export import backend_for

    if backend is None:
        return backend_for(config)
    if backend not in BACKENDS:
        raise TuneError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def _model(name, model_config, weights, model_args: dict, seed: int):
    """(model, preprocessing spec dict) from --model or --model-config."""
    from ..patch import adapter_for
    from ..patch.data_config import data_config

    if model_config:
        from .finetune import load_model

        model, norm = load_model(None, model_config, weights)
        size = list(adapter_for(model).info(model).input_shape[-2:])
        return model, {"size": size, "mean": norm.get("mean"), "std": norm.get("std"), "interpolation": "bilinear",
                       "source": f"{model_config} normalize (no resize)"}
    from ..patch.models import create_model

    model = create_model(name, weights=weights, model_args=model_args, seed=seed)
    return model, data_config(model, name, adapter_for(model).info(model).input_shape[-2:])


def load_images(source, model, spec) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Images preprocessed as the model's own preprocessing ([N,C,H,W]) and the .npz's labels, if any."""
    import numpy as np

    from ..export.precision import calibration_batches
    from ..patch import adapter_for

    shape = [None, *adapter_for(model).info(model).input_shape]
    images = torch.from_numpy(np.concatenate(calibration_batches(source, spec, shape, batch=256)))
    labels = None
    path = Path(source)
    if path.suffix == ".npz" and not path.is_dir():
        with np.load(path, allow_pickle=False) as d:
            if "labels" in d.files:
                raw = d["labels"]
                if raw.ndim != 1 or not np.issubdtype(raw.dtype, np.integer):
                    raise TuneError(f"{path.name}: 'labels' must be one integer per image, got {raw.dtype} "
                                    f"{list(raw.shape)}")
                labels = torch.from_numpy(raw.astype("int64"))
    if labels is not None and len(labels) != len(images):
        raise TuneError(f"{path.name}: {len(images)} images but {len(labels)} labels; give one label per image")
    return images, labels


def _summary(rep: dict, folder: Path) -> None:
    v = rep["verify"]
    fid = f"cosine mean {v['cos_mean']:.4f} worst {v['cos_min']:.4f}"
    if "top1_drop" in v:
        fid += f", top-1 {v['top1']:.2f}% ({-v['top1_drop']:+.2f} pt)"
    measured = f", measured {rep['measured_speedup']:.2f}x" if rep["measured_speedup"] else ""
    click.echo(f"{rep['method']} r={rep['r']}: predicted {rep['predicted_speedup']:.2f}x{measured}; "
               f"verification images ({v['images']}): {fid}")
    click.echo(f"{'goal met' if rep['goal_met'] else 'goal NOT met'}: {rep['reason']}")
    for note in rep["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"wrote {folder / 'schedule.json'} (edgetok export --r @{folder / 'schedule.json'}), "
               f"{folder / 'tune_report.json'}, {folder / 'pareto.png'}")
