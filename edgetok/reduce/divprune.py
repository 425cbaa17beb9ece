"""DivPrune: keep the most diverse subset of tokens (greedy max-min diversity).

Paper: Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token
Pruning for Large Multimodal Models", CVPR 2025 (arXiv:2503.02175); reference
code vbdi/divprune.

Implemented: the paper's greedy solution of the Max-Min Diversity Problem on
cosine distance d(i, j) = 1 - cos(f_i, f_j). The first token picked is the one
farthest from its nearest neighbour; every next pick is the token whose
distance to the nearest already-picked token is largest (first index on
ties), until the budget is reached. In the paper (and in the VLM output stage,
``vlm_output.py``) f are the visual tokens handed to the language model; inside
a ViT block (method ``divprune``) f are the attention keys averaged over heads
(ToMe's metric), between the block's attention and its MLP.

Export: the greedy loop runs a static number of steps (the budget), each an
ArgMax + Gather + Min, and the picks become a score for one
edgetok::token_drop (kept tokens in original order). No new op.

Departures: tokens already picked are masked out of later picks (the reference
relies on their self-distance being 0, which only differs for exact duplicate
tokens); ``protect_first`` tokens (class/register) are always kept and count in
the budget; kept tokens come out in original order, not pick order.
"""
from __future__ import annotations

import torch

from .drop import TokenDrop
from .registry import Plan, register_method
from .scored import cosine, keep_counts, with_prefix


def divprune_score(feats: torch.Tensor, picks: int) -> torch.Tensor:
    """Greedy max-min diversity over ``feats`` [B,M,C]: a score [B,M] whose top
    ``picks`` entries are the picked tokens (earlier pick = higher score), others 0.

    Written for a short unrolled graph (the loop unrolls under export, one copy per
    pick: 169 copies for ViT-Ti at keep 0.5): per pick an ArgMax, the picked token's
    distance row as a one-hot MatMul, a Min and a Where that sets picked tokens to -inf;
    the picks become the score once, after the loop."""
    b, m, _ = feats.shape
    dist = 1.0 - cosine(feats, feats)
    pos = torch.arange(m, device=feats.device)
    eye = pos[:, None] == pos[None, :]
    min_dist = dist.masked_fill(eye, float("inf")).amin(dim=-1, keepdim=True).transpose(1, 2)  # [B,1,M]
    chosen = []
    for step in range(picks):
        i = min_dist.argmax(dim=-1, keepdim=True)  # [B,1,1], first index on ties
        hit = pos == i  # [B,1,M]
        row = hit.to(dist.dtype) @ dist  # the picked token's distances, [B,1,M]
        min_dist = torch.where(hit, float("-inf"), row if step == 0 else torch.minimum(min_dist, row))
        chosen.append(i)
    if not chosen:
        return feats.new_zeros(b, m)
    order = torch.cat(chosen, dim=1)  # [B,picks,1], pick order
    weight = torch.arange(picks, 0, -1, device=feats.device, dtype=feats.dtype)[None, :, None]
    return ((pos == order).to(feats.dtype) * weight).sum(dim=1)


class DivPruneDrop(TokenDrop):
    """One DivPrune step: keep ``keep`` tokens (protected included) that are most diverse."""

    def __init__(self, keep: int, protect_first: int):
        super().__init__(keep, protect_first, False, score="divprune")

    def scores(self, x, ctx):
        p = self.protect_first
        return with_prefix(divprune_score(ctx.metric[:, p:], self.keep - p), p)

    def reduction_flops(self, n: int, dim: int) -> int:
        m = n - self.protect_first
        return 2 * m * m * dim + 3 * m * (self.keep - self.protect_first)


@register_method("divprune", "DivPrune: keep the most diverse tokens (greedy max-min cosine distance on keys)")
def build_divprune(depth: int, tokens: int, protect: int, keep_rate=None, r=None, layers=None,
                   protect_first=None) -> Plan:
    """``keep_rate`` at ``layers`` (default: every third layer) or ``r`` removed per layer."""
    p = protect if protect_first is None else int(protect_first)
    keeps = keep_counts(depth, tokens, p, keep_rate, r, layers, "divprune")
    reducers = [DivPruneDrop(k, p) if k is not None else None for k in keeps]
    params = {"keep_rate": keep_rate, "layers": layers} if keep_rate is not None else {"r": r}
    return Plan("divprune", {**params, "keeps": keeps, "protect_first": p}, reducers)
