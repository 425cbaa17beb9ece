"""The VLM output stage around a vision tower: the wrapper registered as method
``vlm_output`` (the scorers and what the method is: edgetok/reduce/vlm_output.py)."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgetokError, ScheduleError
from ..reduce.base import AttentionContext
from ..reduce.hired import check_partitions
from ..reduce.registry import register_method
from ..reduce.vlm_output import OPTIONS, SCORERS, zero_tprune_counts
from . import adapter_for
from .base import block_forward


class VisionTowerReducer(nn.Module):
    """A vision tower whose forward returns ``budget`` patch tokens of its feature layer."""

    def __init__(self, tower: nn.Module, budget: int, scorer: str, feature_layer: int, options: dict):
        super().__init__()
        self.adapter = adapter_for(tower)
        info = self.adapter.info(tower)
        self.tower = copy.deepcopy(tower)
        self.prefix, self.budget, self.scorer, self.options = info.num_prefix, int(budget), scorer, dict(options)
        self.layer = feature_layer % info.depth
        self.grid = info.grid

    def extra_repr(self) -> str:
        return f"budget={self.budget}, scorer={self.scorer}, feature_layer={self.layer}, options={self.options}"

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        a, tower = self.adapter, self.tower
        x = a.embed(tower, *args, **kwargs)
        blocks = a.blocks(tower)
        for blk in blocks[: self.layer]:
            x, _ = block_forward(a, blk, x, None, False, False)
        # The feature layer by hand: the scorers need its attention as well as its output.
        blk = blocks[self.layer]
        b, n, _ = x.shape
        q, k, v = a.qkv(blk, x)
        scale = a.scale(blk)
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        x = x + a.attn_delta(blk, o.transpose(1, 2).reshape(b, n, -1))
        x = x + a.mlp_delta(blk, x)
        ctx = AttentionContext(q, k, None, scale)
        feats = x[:, self.prefix :]
        score = SCORERS[self.scorer](feats, ctx, self.budget, self.prefix, self.grid, self.options)
        return torch.ops.edgetok.token_drop(feats, score, self.budget, 0, 0)


@register_method("vlm_output", "reduce the patch tokens a CLIP/SigLIP tower hands to a language model to a budget",
                 kind="output")
def build_vlm_output(model: nn.Module, budget: int = 64, scorer: str = "divprune", feature_layer: int = -1,
                     options: Optional[dict] = None) -> VisionTowerReducer:
    """``budget`` patch tokens of ``feature_layer`` chosen by ``scorer`` (one of SCORERS);
    ``options``: hired {partitions}, zero_tprune {r_similarity, iterations}."""
    from ..patch import adapter_for

    if hasattr(model, "edgetok_plan"):
        raise EdgetokError("vlm_output wraps an unreduced tower; apply it to the original model")
    if scorer not in SCORERS:
        raise ScheduleError(f"unknown vlm_output scorer {scorer!r}; use one of {', '.join(SCORERS)}")
    options = dict(options or {})
    unknown = set(options) - OPTIONS.get(scorer, set())
    if unknown:
        raise ScheduleError(f"vlm_output scorer {scorer!r} has no option {', '.join(sorted(unknown))}; "
                            f"its options: {', '.join(sorted(OPTIONS.get(scorer, ()))) or 'none'}")
    info = adapter_for(model).info(model)
    patches = info.tokens - info.num_prefix
    if not 1 <= int(budget) <= patches:
        raise ScheduleError(f"vlm_output budget={budget} must be between 1 and the tower's {patches} patch tokens")
    if not -info.depth <= int(feature_layer) < info.depth:
        raise ScheduleError(f"vlm_output feature_layer={feature_layer} is outside the tower's {info.depth} layers")
    if scorer == "hired":
        check_partitions(options.get("partitions", (2, 2)), info.grid)
    if scorer == "zero_tprune":
        zero_tprune_counts(patches, int(budget), options)  # bad counts fail here, not at the first forward
    return VisionTowerReducer(model, budget, scorer, int(feature_layer), options).train(model.training)
