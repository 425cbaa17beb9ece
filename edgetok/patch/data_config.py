"""The model's own preprocessing, read from where its library keeps it, as the
``PreprocessSpec`` the runtime replays (edgetok/runtime/preprocess.py):

- timm: ``timm.data.resolve_data_config`` (interpolation, mean, std, crop_pct,
  crop_mode), applied as ``timm.data.create_transform`` does at evaluation: the shorter
  edge to floor(size / crop_pct), a centre crop to the size (crop_mode "center"), or both
  edges to floor(size / crop_pct) then the crop ("squash");
- Hugging Face: the model type's image processor (transformers 5.x, torchvision backend),
  from a ``save_pretrained`` folder's preprocessor_config.json when the model came from
  one, else the processor class's defaults: resize (shortest edge, or height x width),
  optional centre crop, rescale, normalise;
- torchvision: the model's ``weights.transforms()`` (resize the shorter edge, centre crop,
  normalise).

The size is always the model's real input size: when a library's default is for another
size (a model built with ``img_size=32``), the resize and crop are scaled by the same
factor and ``source`` says so.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from torch import nn

from ..errors import EdgetokError

_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def data_config(model: nn.Module, name: Optional[str], input_size) -> Optional[dict]:
    """The PreprocessSpec (as a dict) of ``model`` (reduced or not), or None when unknown.
    ``name``: how it was created (a torchvision name, an HF folder); ``input_size``: [H, W]."""
    size = [int(v) for v in input_size]
    for read in (_timm, _hf, _torchvision):
        spec = read(model, name, size)
        if spec is not None:
            return spec
    return None


def _scaled(value: int, factor: float) -> int:
    return int(round(value * factor))


def _timm(model, name, size) -> Optional[dict]:
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or "mean" not in cfg:
        return None
    from timm.data import resolve_data_config

    dc = resolve_data_config({}, model=model)
    crop_pct, mode = dc.get("crop_pct") or 0.875, dc.get("crop_mode") or "center"
    scale = [math.floor(s / crop_pct) for s in size]
    if mode == "squash":
        resize = {"height": scale[0], "width": scale[1]}
    elif mode == "center" and scale[0] == scale[1]:
        resize = {"shortest_edge": scale[0]}
    else:
        raise EdgetokError(f"timm crop_mode {mode!r} with a non-square {size} input is not replayed by edgetok's "
                           "runtime; export a square input size")
    return {"size": size, "resize": resize, "crop": size, "crop_offsets": "round",
            "interpolation": dc["interpolation"], "backend": "pil", "mean": list(dc["mean"]), "std": list(dc["std"]),
            "source": f"timm data config (crop_pct {crop_pct}, crop_mode {mode}) at the model's {size[0]}x{size[1]} input"}


def _hf_processor(model, name):
    """The image processor: the folder's own config when the model came from one, else the class defaults."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    if name and Path(name).is_dir() and (Path(name) / "preprocessor_config.json").is_file():
        proc = transformers.AutoImageProcessor.from_pretrained(name, local_files_only=True)
        return proc, f"{Path(name) / 'preprocessor_config.json'} (transformers {type(proc).__name__})"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None, None
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type.replace("_vision_model", "").replace("_with_registers", ""))
    if isinstance(names, dict):  # transformers 5.x: {"torchvision": ..., "pil": ...}; the default is torchvision's
        names = [names.get("torchvision"), names.get("pil")]
    cls = next((getattr(transformers, n) for n in ([names] if isinstance(names, str) else names or [])
                if n and hasattr(transformers, n)), None)
    return (cls(), f"transformers {cls.__name__} defaults") if cls is not None else (None, None)


def _hf(model, name, size) -> Optional[dict]:
    if getattr(getattr(model, "config", None), "model_type", None) is None:
        return None
    proc, source = _hf_processor(model, name)
    if proc is None:
        return None
    backend = "tensor" if getattr(proc, "backend", "torchvision") != "pil" else "pil"
    psize = proc.size if getattr(proc, "do_resize", True) else None
    resize = ({"shortest_edge": psize.shortest_edge} if psize is not None and psize.shortest_edge
              else {"height": psize.height, "width": psize.width} if psize is not None else None)
    crop = [proc.crop_size.height, proc.crop_size.width] if getattr(proc, "do_center_crop", False) else None
    out = crop or ([resize["height"], resize["width"]] if resize and "height" in resize else None)
    resize, crop, source = _fit(resize, crop, out, size, source)
    normalize = getattr(proc, "do_normalize", True)
    return {"size": size, "resize": resize, "crop": crop, "crop_offsets": "floor" if backend == "tensor" else "round",
            "interpolation": _PIL_RESAMPLE.get(int(proc.resample), "bilinear"), "backend": backend,
            "rescale": float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else 1.0,
            "mean": list(proc.image_mean) if normalize else None, "std": list(proc.image_std) if normalize else None,
            "convert_rgb": bool(getattr(proc, "do_convert_rgb", None) in (None, True)), "source": source}


def _torchvision(model, name, size) -> Optional[dict]:
    if not type(model).__module__.startswith("torchvision.") or not name:
        return None
    import torchvision

    try:
        t = torchvision.models.get_model_weights(name.removeprefix("tv:")).DEFAULT.transforms()
    except (ValueError, KeyError):
        return None
    resize, crop, source = _fit({"shortest_edge": list(t.resize_size)[0]}, list(t.crop_size) * 2, list(t.crop_size) * 2,
                                size, "torchvision weights transforms")
    return {"size": size, "resize": resize, "crop": crop, "crop_offsets": "round", "interpolation": t.interpolation.value,
            "backend": "pil", "mean": list(t.mean), "std": list(t.std), "source": source}


def _fit(resize, crop, out, size, source):
    """Scale a library's resize and crop made for ``out`` [H, W] to the model's ``size``."""
    if out is None or list(out) == list(size):
        return resize, crop, source
    f = size[0] / out[0]
    scaled = {k: _scaled(v, f) for k, v in resize.items()} if resize else None
    return scaled, list(size) if crop else None, (f"{source}, scaled from {out[0]}x{out[1]} to the model's "
                                                  f"{size[0]}x{size[1]} input")
