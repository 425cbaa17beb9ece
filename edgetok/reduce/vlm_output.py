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
class token is not handed over (LLaVA's "patch" feature selection). The
wrapper around a tower is edgetok/patch/vlm_output.py.
"""
from __future__ import annotations

import torch

from .base import AttentionContext
from .divprune import divprune_score
from .hired import check_partitions, hired_score, partition_ids
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
