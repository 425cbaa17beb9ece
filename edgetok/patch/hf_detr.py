"""Hugging Face DETR encoder (DetrModel / DetrForObjectDetection) with Focus-DETR.

DETR's encoder is not an image-ViT block stack (post-norm layers, position
embeddings added to queries and keys, a pixel mask, a decoder reading all
tokens), so it does not go through ``adapter_for``/``run_blocks``. Instead the
encoder module of a copy of the model gets a subclass whose forward runs the
Focus-DETR encoder; the rest of the model (backbone, decoder, heads) is the
model's own code, and the weights and state_dict keys are unchanged.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgetokError, UnsupportedModelError
from ..reduce.focus_detr import focus_select, scatter_back

_SUBCLASSES: dict = {}


def swap_forward(module: nn.Module, forward: Callable, tag: str) -> None:
    """Give ``module`` a subclass of its class whose forward is ``forward`` (ToMe-style
    class swap: weights, keys and isinstance checks stay as they were)."""
    cls = type(module)
    key = (cls, tag)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{tag}{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    module.__class__ = _SUBCLASSES[key]


def detr_encoder(model: nn.Module) -> nn.Module:
    """The DetrEncoder of a DetrModel or a DETR task model, or a clear error."""
    try:
        from transformers.models.detr.modeling_detr import DetrEncoder
    except ImportError:
        raise UnsupportedModelError("Focus-DETR needs transformers with DETR (pip install transformers)") from None
    inner = getattr(model, "model", model)
    enc = getattr(inner, "encoder", None)
    if not isinstance(enc, DetrEncoder):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face DETR model (DetrModel, DetrForObjectDetection, "
            "DetrForSegmentation, or their Deformable-DETR counterparts); Focus-DETR here patches "
            "transformers' DetrEncoder and DeformableDetrEncoder"
        )
    return enc


def additive_key_mask(mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """[B,N] 1/0 pixel mask -> additive [B,1,1,N] key bias (None when nothing is masked)."""
    if mask is None:
        return None
    return torch.zeros_like(mask, dtype=like.dtype).masked_fill(mask == 0, torch.finfo(like.dtype).min)[:, None, None]


def sparse_layer(layer: nn.Module, xq, posq, x, pos, key_bias):
    """One DETR encoder layer updating only the query tokens ``xq`` [B,K,C] while
    attending to all tokens ``x`` [B,N,C] (keys get position embeddings, values not)."""
    a = layer.self_attn
    b, kq, c = xq.shape
    n = x.shape[1]
    heads = c // a.head_dim
    q = a.q_proj(xq + posq).view(b, kq, heads, a.head_dim).transpose(1, 2)
    k = a.k_proj(x + pos).view(b, n, heads, a.head_dim).transpose(1, 2)
    v = a.v_proj(x).view(b, n, heads, a.head_dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias, scale=a.scaling)
    h = layer.self_attn_layer_norm(xq + a.o_proj(o.transpose(1, 2).reshape(b, kq, c)))
    return layer.final_layer_norm(h + layer.mlp(h))


def _focus_encoder_forward(self, inputs_embeds=None, attention_mask=None, spatial_position_embeddings=None, **_):
    from transformers.modeling_outputs import BaseModelOutput

    plan = self.edgetok_plan
    x = inputs_embeds
    pos = spatial_position_embeddings if spatial_position_embeddings is not None else torch.zeros_like(x)
    key_bias = additive_key_mask(attention_mask, x)
    score = self.focus_scorer(x, attention_mask)  # foreground score, once, on the encoder input
    for layer, step in zip(self.layers, plan.reducers):
        xq, idx = focus_select(x, score, step.queries(x.shape[1]))
        posq = pos.gather(1, idx[..., None].expand(-1, -1, pos.shape[-1]))
        x = scatter_back(x, idx, sparse_layer(layer, xq, posq, x, pos, key_bias))
    return BaseModelOutput(last_hidden_state=x)


def reduce_encoder(model: nn.Module, plan, scorer: nn.Module, encoder_of: Callable, forward: Callable,
                   tag: str) -> nn.Module:
    """A copy of ``model`` whose encoder (``encoder_of(model)``) runs ``forward`` with ``plan``
    and the foreground ``scorer`` (registered as ``encoder.focus_scorer``, so its weights
    follow .to() and state_dict)."""
    enc = encoder_of(model)
    if hasattr(enc, "edgetok_plan"):
        raise EdgetokError("this DETR is already reduced; apply Focus-DETR to the original model")
    if len(plan.reducers) != len(enc.layers):
        raise EdgetokError(f"the plan has {len(plan.reducers)} layers but the encoder has {len(enc.layers)}")
    reduced = copy.deepcopy(model)
    enc = encoder_of(reduced)
    swap_forward(enc, forward, tag)
    enc.focus_scorer = copy.deepcopy(scorer)
    enc.edgetok_plan = plan
    reduced.edgetok_plan = plan
    return reduced.train(model.training)


def reduce(model: nn.Module, plan, scorer: nn.Module) -> nn.Module:
    """A Focus-DETR copy of a Hugging Face DETR model."""
    return reduce_encoder(model, plan, scorer, detr_encoder, _focus_encoder_forward, "Focus")
