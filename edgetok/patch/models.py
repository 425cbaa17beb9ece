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
- ``module="pkg.mod:factory"``: the user's own model, ``factory(**model_args)``;
- a folder: a Hugging Face ``save_pretrained`` checkpoint (config.json and its
  safetensors, sharded or not), loaded with its own weights.

``weights`` loads a local state_dict (.safetensors, or a torch file holding a
state_dict, possibly under "state_dict"/"model"). The model's preprocessing is read by
edgetok/patch/data_config.py.
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


def is_checkpoint_folder(name: Optional[str]) -> bool:
    """Whether ``name`` is a folder (a Hugging Face ``save_pretrained`` checkpoint) rather than a model name."""
    try:
        return bool(name) and Path(name).is_dir()
    except OSError:  # a name no path can have (an inline hf: config longer than the OS allows)
        return False


def _hf_folder(path: Path, args: dict) -> nn.Module:
    """A Hugging Face ``save_pretrained`` folder: config.json + weights (safetensors, sharded or not)."""
    import transformers

    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is a folder without config.json; --model takes a model name or a Hugging Face "
                         "save_pretrained folder (config.json + model.safetensors)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, **args)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path / 'config.json'}: not a readable Hugging Face config ({_first(e)})") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ModelError(f"{path / 'config.json'} names no model class transformers has (architectures: "
                         f"{getattr(config, 'architectures', None)}); set \"architectures\" to the class to build")
    try:
        return cls.from_pretrained(str(path), config=config, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:  # missing, corrupt or mismatched weight files
        raise ModelError(f"{path}: cannot load the {cls.__name__} weights ({_first(e)}); check the folder holds "
                         "the complete save_pretrained output") from None


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _build(name: Optional[str], module: Optional[str], args: dict) -> nn.Module:
    try:
        if module is not None:
            model = _module(module, args)
        elif is_checkpoint_folder(name):
            model = _hf_folder(Path(name), args)
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
