"""Hugging Face Deformable-DETR encoder (DeformableDetrModel / DeformableDetrForObjectDetection)
with Focus-DETR.

Deformable-DETR's encoder runs multi-scale deformable attention over the
concatenated feature levels: every token is a query with its own reference
points, and it reads the value maps at sampled locations. A query's output
depends on the value maps but not on the other queries, so Focus-DETR's sparse
layer is the layer's own attention module called with the selected tokens
(and their position embeddings and reference points) as queries and the full
token map as the values; the FFN and norms then run on the selected tokens
alone. As for DETR (hf_detr.py), the encoder of a copy of the model gets a
subclass whose forward runs this; everything else is the model's own code.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..reduce.focus_detr import focus_select, scatter_back
from .hf_detr import reduce_encoder


def _encoder_class():
    try:
        from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrEncoder
    except ImportError:
        return None
    return DeformableDetrEncoder


def is_deformable_detr(model: nn.Module) -> bool:
    cls = _encoder_class()
    return cls is not None and isinstance(getattr(getattr(model, "model", model), "encoder", None), cls)


def deformable_detr_encoder(model: nn.Module) -> nn.Module:
    """The DeformableDetrEncoder of a DeformableDetrModel or its task model, or a clear error."""
    if not is_deformable_detr(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face Deformable-DETR model (DeformableDetrModel, "
            "DeformableDetrForObjectDetection)")
    return getattr(model, "model", model).encoder


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` [B,K] of ``t`` [B,N,...] -> [B,K,...]."""
    flat = t.flatten(2)
    return flat.gather(1, idx[..., None].expand(-1, -1, flat.shape[-1])).view(*idx.shape, *t.shape[2:])


def sparse_layer(layer: nn.Module, xq, posq, refq, x, mask: Optional[torch.Tensor], **maps):
    """One Deformable-DETR encoder layer updating only the queries ``xq`` [B,K,C] (reference
    points ``refq`` [B,K,L,2]) while sampling the values of all tokens ``x`` [B,N,C]."""
    h, _ = layer.self_attn(hidden_states=xq, attention_mask=mask, encoder_hidden_states=x,
                           position_embeddings=posq, reference_points=refq, **maps)
    h = layer.self_attn_layer_norm(xq + h)
    return layer.final_layer_norm(h + layer.mlp(h))


def _focus_encoder_forward(self, inputs_embeds=None, attention_mask=None, spatial_position_embeddings=None,
                           spatial_shapes=None, spatial_shapes_list=None, level_start_index=None,
                           valid_ratios=None, **_):
    from transformers.modeling_outputs import BaseModelOutput

    x = inputs_embeds
    shapes = [tuple(int(v) for v in s) for s in spatial_shapes_list]
    pos = spatial_position_embeddings if spatial_position_embeddings is not None else torch.zeros_like(x)
    ref = self.get_reference_points(tuple(shapes), valid_ratios, device=x.device)
    maps = dict(spatial_shapes=spatial_shapes, spatial_shapes_list=spatial_shapes_list,
                level_start_index=level_start_index)
    score = self.focus_scorer(x, attention_mask, shapes)  # multi-scale foreground score, once
    for layer, step in zip(self.layers, self.edgetok_plan.reducers):
        xq, idx = focus_select(x, score, step.queries(x.shape[1]))
        xq = sparse_layer(layer, xq, gather_rows(pos, idx), gather_rows(ref, idx), x, attention_mask, **maps)
        x = scatter_back(x, idx, xq)
    return BaseModelOutput(last_hidden_state=x)


def reduce(model: nn.Module, plan, scorer: nn.Module) -> nn.Module:
    """A Focus-DETR copy of a Hugging Face Deformable-DETR model."""
    return reduce_encoder(model, plan, scorer, deformable_detr_encoder, _focus_encoder_forward, "Focus")
