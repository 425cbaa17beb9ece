"""Models by name, always with random weights unless a local checkpoint is given.

Spellings ``create_model`` accepts:

- ``vit_small_patch16_224`` or ``timm:vit_small_patch16_224``: timm
  (``timm.create_model(name, pretrained=False, **model_args)``);
- ``tv:vit_b_16`` (or a bare torchvision name that timm does not have):
  ``torchvision.models.get_model(name, weights=None, **model_args)``;
- ``hf:ViTForImageClassification`` (the config class's defaults) or
  ``hf:ViTModel:{"num_hidden_layers": 2, "image_size": 32}`` (JSON overrides)
  or ``hf:CLIPVisionModel:cfg.json`` (a config file): a Hugging Face
  transformers model built from its config, never downloaded;
- ``module="pkg.mod:factory"``: the user's own model, ``factory(**model_args)``.

``weights`` loads a local state_dict (.safetensors, or a torch file holding a
state_dict, possibly under "state_dict"/"model"). ``preprocessing`` reads
mean/std/size/interpolation from where each library keeps its defaults.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional

from torch import nn

from ..errors import EdgetokError


class ModelError(EdgetokError, ValueError):
    """A model name, factory or checkpoint that edgetok cannot turn into a model."""


def _timm(name: str, args: dict) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelError(f"unknown timm model {name!r}; list them with timm.list_models('vit*')")
    return timm.create_model(name, pretrained=False, **args)


def _torchvision(name: str, args: dict) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ModelError(f"unknown torchvision model {name!r}; list them with torchvision.models.list_models()")
    return torchvision.models.get_model(name, weights=None, **args)


def _hf(spec: str, args: dict) -> nn.Module:
    import transformers

    cls_name, _, cfg_text = spec.partition(":")
    cls = getattr(transformers, cls_name, None)
    if cls is None or not hasattr(cls, "config_class"):
        raise ModelError(f"transformers has no model class {cls_name!r}; use e.g. hf:ViTForImageClassification")
    overrides: dict = {}
    if cfg_text:
        try:
            # inline JSON first: a long JSON string is not a valid file name (ENAMETOOLONG)
            overrides = json.loads(cfg_text if cfg_text.lstrip().startswith("{") else Path(cfg_text).read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise ModelError(f"cannot read the config of {spec!r} as JSON or a JSON file: {e}") from None
    config = cls.config_class(**{**overrides, **args})
    return cls(config)


def _module(spec: str, args: dict) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    if not attr:
        raise ModelError(f"--module {spec!r} must be 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot load {spec!r}: {e}") from None
    model = factory(**args)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def create_model(name: Optional[str] = None, *, module: Optional[str] = None, weights=None,
                 model_args: Optional[dict] = None, seed: int = 0) -> nn.Module:
    """A model in eval mode from a name or a factory (see the module docstring). Its random
    initial weights come from ``seed`` (the same model name and seed give the same weights, so a
    reduced export and its unreduced baseline are one network); the global RNG is left as it was."""
    import torch

    if (name is None) == (module is None):
        raise ModelError("give exactly one of a model name or module='pkg.mod:factory'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(name, module, dict(model_args or {}))
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _build(name: Optional[str], module: Optional[str], args: dict) -> nn.Module:
    try:
        if module is not None:
            model = _module(module, args)
        elif name.startswith("hf:"):
            model = _hf(name[3:], args)
        elif name.startswith("tv:"):
            model = _torchvision(name[3:], args)
        elif name.startswith("timm:"):
            model = _timm(name[5:], args)
        else:
            import timm
            import torchvision

            if timm.is_model(name):
                model = _timm(name, args)
            elif name in torchvision.models.list_models():
                model = _torchvision(name, args)
            else:
                raise ModelError(
                    f"unknown model {name!r}: not a timm or torchvision model name; use hf:ModelClass for "
                    "transformers, or --module pkg.mod:factory for your own model"
                )
    except TypeError as e:  # bad model_args
        raise ModelError(f"cannot build {name or module} with {args}: {e}") from None
    return model


def load_weights(model: nn.Module, path) -> None:
    """Load a local checkpoint (.safetensors, .pt/.pth/.bin state dict, or an ONNX
    file's initializers) into ``model``; names of other families are converted
    where edgetok.patch.weights knows how (HF DINOv2 <-> timm). Every key must fit."""
    from .weights import load_weights as load_into_model

    load_into_model(path, model=model)


# ---------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------

def _timm_pre(model) -> Optional[dict]:
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or "mean" not in cfg:
        return None
    return {
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "crop_pct": cfg.get("crop_pct"),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "source": "timm pretrained_cfg",
    }


_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _hf_pre(model) -> Optional[dict]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return None
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type.replace("_vision_model", ""))
    names = [names] if isinstance(names, str) else list(names or [])
    proc_cls = next((getattr(transformers, n) for n in names if n and hasattr(transformers, n)), None)
    if proc_cls is None:
        return None
    try:
        proc = proc_cls()
    except Exception:  # some processors need files; fall back to no preprocessing info
        return None
    resample = getattr(proc, "resample", None)
    return {
        "mean": list(proc.image_mean),
        "std": list(proc.image_std),
        "resize": None,
        "interpolation": _RESAMPLE.get(int(resample), str(resample)) if resample is not None else None,
        "source": f"transformers {proc_cls.__name__} defaults",
    }


def _tv_pre(model, name: Optional[str]) -> Optional[dict]:
    if not type(model).__module__.startswith("torchvision.") or not name:
        return None
    import torchvision

    try:
        t = torchvision.models.get_model_weights(name.removeprefix("tv:")).DEFAULT.transforms()
    except (ValueError, KeyError):
        return None
    return {
        "mean": list(t.mean),
        "std": list(t.std),
        "resize": list(t.resize_size)[0],
        "interpolation": t.interpolation.value,
        "source": "torchvision weights transforms",
    }


def preprocessing(model: nn.Module, name: Optional[str], input_size) -> Optional[dict]:
    """Mean/std/size/interpolation for ``model`` (reduced or not), or None when unknown.
    ``size`` is the model's actual input size [H, W]."""
    pre = _timm_pre(model) or _hf_pre(model) or _tv_pre(model, name)
    if pre is None:
        return None
    pre["size"] = list(input_size)
    if pre.get("crop_pct"):  # timm: resize the shorter side to size / crop_pct, then center-crop
        pre["resize"] = int(input_size[0] / pre["crop_pct"])
    pre.setdefault("resize", None)
    return {k: pre[k] for k in ("mean", "std", "size", "resize", "interpolation", "source")}
