"""``edgetok export``: model name -> reduced model -> DIR/model.onnx + DIR/manifest.json."""
from __future__ import annotations

import click

from ..export.targets import TARGETS


def _key_values(pairs, what: str) -> dict:
    """KEY=VALUE pairs, values read as YAML scalars (8 -> int, 0.7 -> float, true -> bool)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=what)
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _dtd_threshold(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise click.BadParameter(f"{value!r}: dtd takes one threshold (a number, 0..1)", param_hint="--threshold")


@click.command(context_settings={"max_content_width": 110})
@click.option("--model", "model_name", metavar="NAME",
              help="timm name (vit_small_patch16_224), tv:NAME for torchvision, hf:ModelClass[:JSON] for "
                   "transformers, or a Hugging Face save_pretrained folder (its weights and preprocessing). "
                   "Seeded random weights unless --weights or a folder gives them.")
@click.option("--module", metavar="PKG.MOD:FACTORY",
              help="Your own model: FACTORY(**model_args) returns an nn.Module (instead of --model).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Argument for the model constructor, repeatable (e.g. img_size=384, depth=6).")
@click.option("--weights", type=click.Path(dir_okay=False), metavar="FILE",
              help="Local checkpoint (.safetensors or a torch state_dict) loaded strictly into the model.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the model's random initial weights (ignored with --weights): the same model and seed "
                   "give the same network, so a reduced export and its unreduced baseline compare.")
@click.option("--method", default="tome", show_default=True, metavar="NAME",
              help="Reduction method (`edgetok methods` lists them), or 'none' to export the unreduced model.")
@click.option("--r", "r", metavar="SCHEDULE",
              help="Tokens merged/dropped per layer: '8', one per layer '8,8,4,0', 'linear:16:0', or @FILE (the "
                   "schedule.json `edgetok tune` wrote).")
@click.option("--keep-rate", type=float, help="drop: fraction of tokens kept at each drop layer (EViT: 0.7).")
@click.option("--layers", metavar="I,J,..", help="drop with --keep-rate: the layers that drop (default every 3rd).")
@click.option("--fuse-dropped", is_flag=True, default=None, help="drop: append the fused token (EViT).")
@click.option("--threshold", metavar="SCHEDULE",
              help="dymu: similarity threshold, one value or one per layer; dtd: the change 1-cos a token needs "
                   "to be kept (0..1).")
@click.option("--schedule", type=click.Choice(["auto"]),
              help="auto: choose the per-layer r for the --target config's backend from a measured (cached) cost "
                   "table; never slower than unreduced (r=0 then, with the reason). Needs --min-speedup or "
                   "--budget-ms.")
@click.option("--min-speedup", type=click.FloatRange(min=1.0, min_open=True), metavar="X",
              help="--schedule auto goal: predicted speed-up over the unreduced model.")
@click.option("--budget-ms", type=click.FloatRange(min=0, min_open=True), metavar="Y",
              help="--schedule auto goal: predicted latency budget in ms at the config's opt batch.")
@click.option("--cost-cache", type=click.Path(file_okay=False), metavar="DIR",
              help="--schedule auto: cost-table cache directory (default $EDGETOK_CACHE or ~/.cache/edgetok).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Any other method parameter, repeatable (e.g. prop_attn=false, protect_first=1).")
@click.option("--config", metavar="NAME|FILE",
              help="Export config (export_configs/*.yaml, e.g. jetson-orin-nano): target, opset, batch profile.")
@click.option("--target", metavar="TARGET|CONFIG",
              help=f"Export target ({', '.join(TARGETS)}) -- portable: bodies kept (ORT); trt: bodies stripped "
                   "(TensorRT <= 10.6 must use the plugin); trt-override: bodies kept, TensorRT >= 10.15 picks the "
                   "plugin; inlined: standard ops only -- or an export config (same as --config). Default: the "
                   "config's, else portable.")
@click.option("--opset", type=click.IntRange(17, 23), help="ONNX opset (default: the config's, else 18).")
@click.option("--batch", type=click.IntRange(min=1),
              help="Fix the batch size (default: dynamic batch axis named 'batch').")
@click.option("--input-size", metavar="H,W|L",
              help="Example size the graph is traced at, for models that have none of their own: DETR images "
                   "(H,W; default 512,512), T5 sequences (L; default 256). Image ViTs take theirs from the model.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Max abs difference allowed between ONNX Runtime CPU and torch.")
@click.option("--no-parity", is_flag=True, help="Skip the ONNX Runtime parity check.")
@click.option("--strict", is_flag=True, help="tome: an r larger than a layer can merge is an error (default: clamp "
              "it per layer, as ToMe's reference code does, and print a note naming the layers).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Directory for model.onnx and manifest.json (written atomically; a previous export's two files "
                   "there are replaced, every other file stays).")
@click.option("--force", is_flag=True, help="Write into a non-empty directory that holds no edgetok export.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]),
              help="Graph precision (default: the config's where the export carries it, else fp32): fp16 keeps "
                   "the reduction ops in float32; int8 is Q/DQ static quantization of the linear layers "
                   "(needs --calibration). See docs/precision.md.")
@click.option("--calibration", type=click.Path(exists=True), metavar="DIR|NPZ",
              help="int8: calibration images (a folder of images or an .npz), preprocessed as the model's own "
                   "preprocessing; a fifth is held out to check the int8 graph against float32.")
def export(model_name, module, model_args, weights, seed, method, r, keep_rate, layers, fuse_dropped, threshold, schedule,
           min_speedup, budget_ms, cost_cache, params, config, target, opset, batch, input_size, tolerance, no_parity,
           output, force, precision, calibration, strict):
    """Export a (token-reduced) vision transformer to ONNX with one edgetok node per reduction step.

    \b
    edgetok export --model vit_small_patch16_224 --method tome --r 8 -o out/vit-s-tome
    edgetok export --model deit_tiny_patch16_224 --method drop --keep-rate 0.7 --config jetson-orin-nano -o out/d
    edgetok export --model hf:ViTForImageClassification --method dymu --threshold 0.9 -o out/hf
    edgetok export --model vit_small_patch16_224 --schedule auto --target cpu-ort --min-speedup 1.3 -o out/auto
    edgetok export --model vit_small_patch16_224 --method dtd --threshold 0.1 -o out/dtd-step
    edgetok export --model vit_small_patch16_224 --method tome --r 8 --precision int8 --calibration imgs/ -o out/q
    edgetok export --model hf:T5EncoderModel --method mrt5 --param max_keep=128 --input-size 256 -o out/mrt5
    """
    from rich.console import Console

    from ..config import load_config
    from ..patch.models import is_checkpoint_folder
    from ..reduce.registry import get_method, takes_param

    if (model_name is None) == (module is None):
        raise click.UsageError("give exactly one of --model NAME or --module PKG.MOD:FACTORY")
    method_params = _method_params(method, params, r, keep_rate, threshold, fuse_dropped, layers)
    if method != "none":
        get_method(method)  # unknown method: fail before building the model
        if not strict and takes_param(method, "clamp"):  # ToMe users expect r clamped per layer (issue 22)
            method_params.setdefault("clamp", True)
    target, config = _target_or_config(target, config)
    cfg = load_config(config) if config else None
    from ..export.output import check_output
    from ..export.precision import export_precision

    check_output(output, force)  # before the model is built
    export_precision(precision, cfg, calibration)  # a precision the target cannot do: refused before the build
    _check_schedule(schedule, r, min_speedup, budget_ms, cfg, method)
    opts = dict(method=method, method_params=method_params, schedule=schedule, min_speedup=min_speedup,
                budget_ms=budget_ms, cost_cache=cost_cache, target=target, opset=opset, batch=batch,
                input_size=input_size, tolerance=tolerance, config=cfg, check_parity=not no_parity, output=output,
                seed=None if weights or is_checkpoint_folder(model_name) else seed, force=force,
                precision=precision, calibration=calibration)
    console = Console(stderr=True)
    with console.status("building the model") as status:
        def step(msg):
            console.log(f"[green]ok[/] {status.status}")
            status.update(msg)

        from ..patch.models import create_model

        model = create_model(model_name, module=module, weights=weights,
                             model_args=_key_values(model_args, "--model-arg"), seed=seed)
        name = model_name or f"module:{module}"
        family = _export_family_of(model, name, schedule, method)
        result = (_export_family(model, name, family, opts, step) if family is not None
                  else _export_image(model, name, opts, step))
        console.log(f"[green]ok[/] {status.status}")
    return _report(console, result)


def _method_params(method, params, r, keep_rate, threshold, fuse_dropped, layers) -> dict:
    method_params = _key_values(params, "--param")
    if r is not None and r.startswith("@"):  # a schedule file written by `edgetok tune`
        from ..tune.budget import read_schedule

        r, method_params = read_schedule(r[1:], method, method_params)
    for key, value in (("r", r), ("keep_rate", keep_rate), ("threshold", threshold), ("fuse_dropped", fuse_dropped),
                       ("layers", _layers(layers) if layers else None)):
        if value is not None:
            method_params[key] = value
    if method == "dtd" and "threshold" in method_params:
        method_params["threshold"] = _dtd_threshold(method_params["threshold"])
    return method_params


def _layers(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma list of block indices (e.g. 3,6,9)",
                                 param_hint="--layers") from None


def _target_or_config(target, config):
    """--target CONFIG names the device the export is for, as --config does."""
    if target is not None and target not in TARGETS:
        if config:
            raise click.UsageError(f"--target {target!r} is not an export target ({', '.join(TARGETS)}) and "
                                   "--config is given too; pass the config once")
        return None, target
    return target, config


def _check_schedule(schedule, r, min_speedup, budget_ms, cfg, method) -> None:
    if schedule != "auto":
        if min_speedup is not None or budget_ms is not None:
            raise click.UsageError("--min-speedup and --budget-ms are goals of --schedule auto; add --schedule auto")
        return
    if r is not None:
        raise click.UsageError("give either --r or --schedule auto, not both")
    if (min_speedup is None) == (budget_ms is None):
        raise click.UsageError("--schedule auto needs exactly one goal: --min-speedup X or --budget-ms Y")
    if cfg is None:
        raise click.UsageError("--schedule auto needs the device it is for: --target CONFIG (e.g. cpu-ort)")
    from ..tune.export import backend_for, check_method

    check_method(method)  # fail before building the model: wrong method, or a TensorRT config
    backend_for(cfg)


def _export_family_of(model, name: str, schedule, method):
    """None for a model an image adapter knows; its export family (DETR, T5, DiT) otherwise."""
    from ..errors import UnsupportedModelError
    from ..export.families import FAMILIES, family_for
    from ..patch import adapter_for

    try:
        adapter_for(model)
        return None
    except UnsupportedModelError as e:
        family = family_for(model)
        if family is None:  # the message lists the families one per line: keep one line
            raise UnsupportedModelError("; ".join(l.strip() for l in str(e).splitlines() if l.strip())
                                        + "; and for export only: "
                                        + "; ".join(f.describes for f in FAMILIES)) from None
    if schedule == "auto" or method == "dtd":
        raise click.UsageError(f"--{'schedule auto' if schedule else 'method dtd'} needs an image ViT; "
                               f"{name} is a {family.describes}")
    return family


def _export_family(model, name: str, family, o: dict, step):
    from .. import apply
    from ..export.exporter import export_family

    step(f"applying {o['method']}")
    reduced = model if o["method"] == "none" else apply(model, o["method"], **o["method_params"])
    size = [int(v) for v in o["input_size"].split(",")] if o["input_size"] else None
    return export_family(reduced, o["output"], family, input_size=size, target=o["target"], opset=o["opset"],
                         batch=o["batch"], tolerance=o["tolerance"], model_name=name, config=o["config"],
                         check_parity=o["check_parity"], progress=step, seed=o["seed"], force=o["force"],
                         precision=o["precision"], calibration=o["calibration"])


def _export_image(model, name: str, o: dict, step):
    from .. import apply
    from ..export import export_model
    from ..patch import adapter_for
    from ..patch.data_config import data_config

    if o["input_size"]:
        raise click.UsageError("--input-size is for models without an image size of their own (DETR, T5); "
                               "build an image ViT for another size with --model-arg img_size=...")
    shape = adapter_for(model).info(model).input_shape
    common = dict(target=o["target"], opset=o["opset"], batch=o["batch"], tolerance=o["tolerance"], model_name=name,
                  preprocessing=data_config(model, name, shape[-2:]), config=o["config"],
                  check_parity=o["check_parity"], progress=step, seed=o["seed"], force=o["force"],
                  precision=o["precision"], calibration=o["calibration"])
    method, params, auto = o["method"], o["method_params"], None
    if o["schedule"] == "auto":
        from ..tune.export import choose

        step(f"choosing the schedule for {o['config'].name} (cost table: measured once, then cached)")
        _, auto = choose(model, o["config"], method, batch=o["batch"], budget_ms=o["budget_ms"],
                         min_speedup=o["min_speedup"], cache=o["cost_cache"])
        params["r"] = auto["r"]
    step(f"applying {method}")
    if method == "dtd":  # an output-stage method: the export is one streaming step (export/dtd.py)
        from ..export.dtd import export_dtd_step

        return export_dtd_step(apply(model, "dtd", **(params | {"streaming": True})), o["output"], **common)
    reduced = model if method == "none" else apply(model, method, **params)
    from ..reduce.tome import clamp_note

    if clamp_note(getattr(reduced, "edgetok_plan", None)):
        click.echo(f"note: {clamp_note(reduced.edgetok_plan)}", err=True)
    return export_model(reduced, o["output"], schedule=auto, **common)


def _report(console, result) -> int:
    m = result.manifest.model_dump(mode="json")
    flops = m["flops"]
    console.print(f"[bold]{result.onnx_path}[/] target={m['target']} opset={m['opset']} "
                  f"edgetok nodes={len(m['edgetok_ops'])} bodies={m['function_bodies'] or 'none'}")
    if m["tokens"]:
        console.print(f"tokens per layer: {m['tokens']}" + (" (upper bounds)" if m["adaptive"] else ""))
    else:
        console.print("inputs: " + ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in m["inputs"]))
    if flops:
        console.print(f"GFLOPs {flops['total'] / 1e9:.3f} vs {flops['baseline'] / 1e9:.3f} unreduced "
                      f"(ideal speed-up {flops['ratio']:.2f}x)")
    if m["stream"]:
        st = m["stream"]
        console.print(f"streaming step: inputs {m['input']['name']}, {st['state_input']['name']} (zeros on the "
                      f"first frame); feed output {st['state_output']} back as {st['state_input']['name']}")
    if m["schedule"] and m["schedule"]["source"] == "auto":
        from ..tune.export import summary

        console.print(summary(m["schedule"]))
    if m["parity"]:
        errs = ", ".join(f"bs{b}: {e:.2g}" for b, e in m["parity"]["max_abs_err"].items())
        console.print(f"ONNX Runtime CPU parity ({m['parity']['checked_on']}): max abs err {errs}")
    _report_precision(console, m["precision"])
    return 0


def _report_precision(console, rec: dict) -> None:
    if rec["precision"] != "fp32":
        for p in rec["parity"]:
            console.print(f"{rec['precision']} vs float32 ({p['inputs']}, {p['samples']} samples): max rel err "
                          f"{p['max_rel_err']:.3g}, cosine min {p['cosine_min']:.4f}")
    if rec.get("note"):
        console.print(f"precision: {rec['note']}")
