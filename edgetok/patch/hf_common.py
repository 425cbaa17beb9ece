"""What the Hugging Face vision adapters share: the layer layout as data, the
forward's keyword handling, and class look-up that never imports transformers.

Every HF vision encoder edgetok reduces (ViT, CLIP, SigLIP, DINOv2) has the
same pre-norm layer: norm -> q/k/v projections -> attention -> output
projection (-> layer scale) -> residual, norm -> MLP (-> layer scale) ->
residual. Only the attribute names differ, so each family declares them in a
LayerSpec and HFAdapter implements qkv/attn_delta/mlp_delta once.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import EdgetokError, UnsupportedModelError
from .base import Adapter, ModelInfo, linear_weights, run_blocks


def loaded_classes(module: str, *names: str) -> tuple:
    """Classes from an already-imported module. A model of one of these classes
    can only exist if its module was imported, so matching never imports the library."""
    mod = sys.modules.get(module)
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n)) if mod is not None else ()


def pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass(frozen=True)
class LayerSpec:
    """Attribute names of one HF encoder layer (None: the layer has no such part)."""

    norm1: str
    attn: str
    out_proj: str  # inside attn
    norm2: str
    mlp: str
    heads: str  # attribute of attn: number of heads
    scale: str  # attribute of attn: softmax scale
    ls1: Optional[str] = None  # layer scale after attention (DINOv2)
    ls2: Optional[str] = None
    dropout: Optional[str] = None  # residual-branch dropout (ViT)
    drop_path: Optional[str] = None  # stochastic depth on both branches (DINOv2)


def _apply(layer: nn.Module, name: Optional[str], x: torch.Tensor) -> torch.Tensor:
    return x if name is None else getattr(layer, name)(x)


# forward keywords of HF vision models that a reduced model cannot honour
_REJECTED = {
    "output_attentions": "attention maps change size at every reduced layer",
    "output_hidden_states": "hidden states change size at every reduced layer",
    "bool_masked_pos": "masked-image modelling needs every patch token",
    "attention_mask": "token reduction changes the token count, so a fixed mask cannot apply",
}


class HFAdapter(Adapter):
    """Shared hooks for Hugging Face pre-norm vision encoders. A family sets
    ``spec``, ``layer_class`` and implements core/layers/num_prefix/embed/finish."""

    spec: LayerSpec
    module: str = ""  # transformers module holding the family's classes
    class_names: tuple = ()  # model classes the adapter reduces
    layer_names: tuple = ()  # encoder layer classes it knows

    def matches(self, model) -> bool:
        classes = loaded_classes(self.module, *self.class_names)
        return bool(classes) and type(model) in classes

    def core(self, model) -> nn.Module:
        """The backbone (embeddings, layers, final norm) inside a task model."""
        raise NotImplementedError

    def num_prefix(self, model) -> int:
        return 1

    def check(self, model) -> None:
        layers = loaded_classes(self.module, *self.layer_names)
        for i, layer in enumerate(self.blocks(model)):
            if type(layer) not in layers:
                raise UnsupportedModelError(
                    f"layer {i} of this {type(model).__name__} is {type(layer).__name__}; edgetok's {self.family} "
                    f"adapter reduces {', '.join(self.layer_names)} only"
                )

    def info(self, model) -> ModelInfo:
        core = self.core(model)
        cfg = core.config
        layer = self.blocks(model)[0]
        attn = getattr(layer, self.spec.attn)
        heads = getattr(attn, self.spec.heads)
        return ModelInfo(
            family=self.family,
            depth=len(self.blocks(model)),
            dim=cfg.hidden_size,
            heads=heads,
            head_dim=attn.head_dim,
            num_prefix=self.num_prefix(model),
            patch_size=pair(cfg.patch_size)[0],
            image_size=pair(cfg.image_size),
            in_chans=cfg.num_channels,
            attn_weights=linear_weights(attn),
            mlp_weights=linear_weights(getattr(layer, self.spec.mlp)),
        )

    def qkv(self, layer, x):
        s = self.spec
        attn = getattr(layer, s.attn)
        h = getattr(layer, s.norm1)(x)
        b, n, _ = x.shape
        shape = (b, n, getattr(attn, s.heads), attn.head_dim)
        return tuple(proj(h).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def scale(self, layer) -> float:
        return getattr(getattr(layer, self.spec.attn), self.spec.scale)

    def attn_delta(self, layer, o):
        s = self.spec
        out = getattr(getattr(layer, s.attn), s.out_proj)(o)
        return _apply(layer, s.drop_path, _apply(layer, s.dropout, _apply(layer, s.ls1, out)))

    def mlp_delta(self, layer, x):
        s = self.spec
        out = getattr(layer, s.mlp)(getattr(layer, s.norm2)(x))
        return _apply(layer, s.drop_path, _apply(layer, s.dropout, _apply(layer, s.ls2, out)))

    def forward(self, model, pixel_values=None, *args, **kwargs):
        """HF-style call: ``model(pixel_values=..., return_dict=..., labels=...)``."""
        if args:
            raise TypeError(
                f"reduced {type(model).__name__} takes pixel_values positionally and everything else by keyword"
            )
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        for key, why in _REJECTED.items():
            value = kwargs.pop(key, None)
            if value is not None and value is not False:
                raise EdgetokError(f"a reduced {type(model).__name__} does not support {key}=: {why}")
        interpolate = bool(kwargs.pop("interpolate_pos_encoding", False))
        labels = kwargs.pop("labels", None)
        if kwargs:
            raise TypeError(f"reduced {type(model).__name__} got unexpected arguments: {', '.join(kwargs)}")
        tokens, size = run_blocks(self, model, self.embed(model, pixel_values, interpolate_pos_encoding=interpolate))
        out = self.finish(model, tokens, size, labels=labels)
        return out if return_dict else out.to_tuple()

    @staticmethod
    def loss(model, labels, logits):
        return None if labels is None else model.loss_function(labels, logits, model.config)
