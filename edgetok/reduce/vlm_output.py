"""Output-stage reduction for VLM vision towers: hand a language model a fixed
budget of visual tokens instead of all of them.

A CLIP or SigLIP tower in a VLM (LLaVA-style) gives the language model every
patch token of its feature layer; the methods of DivPrune (arXiv:2503.02175),
HiRED (arXiv:2408.10945) and others cut that sequence to a budget after the
tower. ``apply(tower, "vlm_output", budget=64, scorer="divprune")`` wraps a
tower (any edgetok adapter family: HF CLIP/SigLIP vision models, timm and HF
ViTs, ...) so that ``forward(images) -> (tokens [B, budget, C], idx [B, budget])``:
the kept patch tokens of ``feature_layer`` (LLaVA uses the penultimate, -2) in
original order and their patch positions.

Scorers (see SCORERS): ``divprune`` (greedy max-min diversity of the output
features, as in DivPrune), ``hired`` (class-attention budget per image
partition, then top tokens per partition), ``zero_tprune`` (weighted-PageRank
importance, then similarity pruning), ``cls_attn`` (FastV/VisionZip-style
class-token attention), ``mean_attn``. Attention scores use the feature
layer's own attention. Towers without a class token (SigLIP) use the mean
attention a token receives wherever a scorer asks for class attention.

Implemented: the selection at the tower output through one
edgetok::token_drop (no new op); the layers after ``feature_layer`` are not
run. Not implemented: the multimodal projector and the language model; the
class token is not handed over (LLaVA's "patch" feature selection).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgetokError, ScheduleError
from .base import AttentionContext
from .divprune import divprune_score
from .hired import check_partitions, hired_score, partition_ids
from .registry import register_method
from .scored import attention_probs
from .zero_tprune import check_counts, weighted_page_rank, zero_tprune_score


def _attention_score(ctx: AttentionContext, prefix: int) -> torch.Tensor:
    return (ctx.cls_attn if prefix >= 1 else ctx.mean_attn)[:, prefix:]


def _cls_attn(feats, ctx, keep, prefix, grid, options):
    return _attention_score(ctx, prefix)


def _mean_attn(feats, ctx, keep, prefix, grid, options):
    return ctx.mean_attn[:, prefix:]


def _divprune(feats, ctx, keep, prefix, grid, options):
    return divprune_score(feats, keep)


def _hired(feats, ctx, keep, prefix, grid, options):
    parts = check_partitions(options.get("partitions", (2, 2)), grid)
    return hired_score(_attention_score(ctx, prefix), keep, partition_ids(grid, parts), parts[0] * parts[1])


def zero_tprune_counts(m: int, keep: int, options: dict) -> tuple[int, int]:
    """(r_importance, r_similarity) that take ``m`` patch tokens to ``keep``. Default: half
    each, but the S-stage can remove at most half of what the I-stage keeps, i.e. at most
    ``keep`` tokens."""
    r_sim = int(options.get("r_similarity", min((m - keep) // 2, keep)))
    r_imp = m - keep - r_sim
    check_counts(m, 0, r_imp, r_sim, "vlm_output: ")
    return r_imp, r_sim


def _zero_tprune(feats, ctx, keep, prefix, grid, options):
    r_imp, r_sim = zero_tprune_counts(feats.shape[1], keep, options)
    importance = weighted_page_rank(attention_probs(ctx), int(options.get("iterations", 10)))[:, prefix:]
    return zero_tprune_score(importance, feats, r_imp, r_sim)


SCORERS = {"divprune": _divprune, "hired": _hired, "zero_tprune": _zero_tprune, "cls_attn": _cls_attn,
           "mean_attn": _mean_attn}
OPTIONS = {"hired": {"partitions"}, "zero_tprune": {"r_similarity", "iterations"}}


class VisionTowerReducer(nn.Module):
    """A vision tower whose forward returns ``budget`` patch tokens of its feature layer."""

    def __init__(self, tower: nn.Module, budget: int, scorer: str, feature_layer: int, options: dict):
        super().__init__()
        from ..patch import adapter_for

        self.adapter = adapter_for(tower)
        info = self.adapter.info(tower)
        self.tower = copy.deepcopy(tower)
        self.prefix, self.budget, self.scorer, self.options = info.num_prefix, int(budget), scorer, dict(options)
        self.layer = feature_layer % info.depth
        self.grid = info.grid

    def extra_repr(self) -> str:
        return f"budget={self.budget}, scorer={self.scorer}, feature_layer={self.layer}, options={self.options}"

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        from ..patch.base import block_forward

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
