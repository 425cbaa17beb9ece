"""Zero-TPrune: importance from the attention graph (weighted PageRank), then
similarity-based pruning of the less important tokens.

Paper: Wang, Dedhia, Jha, "Zero-TPrune: Zero-Shot Token Pruning through
Leveraging of the Attention Graph in Pre-Trained Transformers", CVPR 2024
(arXiv:2305.17328).

Implemented, per pruning layer (between the block's attention and its MLP):
- I-stage: the attention matrix A (rows: queries, softmax over keys) is the
  adjacency matrix of a graph; the Weighted Page Rank iteration
  s <- A^T s from the uniform distribution gives each token the importance it
  receives from important tokens. ``iterations`` steps per head, averaged over
  heads. The ``r_importance`` least important tokens are pruned.
- S-stage: the surviving unprotected tokens are ranked by importance and split
  into the more important half (targets) and the less important half
  (sources); each source's similarity is its best cosine similarity (attention
  keys averaged over heads) to a target, and the ``r_similarity`` most
  similar sources are pruned (they are redundant with a kept token).
Both stages end in one edgetok::token_drop whose score marks the pruned tokens
last (kept tokens in original order). No new op.

Departures: the paper's head aggregation (emphasising informative regions,
variance-based head filtering) is replaced by a plain mean over heads; the
iteration count is a parameter rather than a convergence test; the
importance-ordered split into halves is one of the paper's partition choices;
ties break towards the lower token index; ``protect_first`` tokens
(class/register) are never pruned and are not similarity targets.
"""
from __future__ import annotations

import torch

from ..errors import ScheduleError
from .drop import TokenDrop
from .registry import Plan, register_method
from .schedule import resolve_counts
from .scored import attention_probs, cosine, descending_rank, rank_to_score, with_prefix


def weighted_page_rank(attn: torch.Tensor, iterations: int) -> torch.Tensor:
    """Importance [B,N] from attention [B,H,N,N]: s <- A^T s per head, from uniform, mean over heads."""
    n = attn.shape[-1]
    s = attn.new_full(attn.shape[:-1], 1.0 / n)[..., None, :]  # [B,H,1,N]
    for _ in range(iterations):
        s = s @ attn
    return s[..., 0, :].mean(1)


def zero_tprune_score(importance: torch.Tensor, metric: torch.Tensor, r_importance: int,
                      r_similarity: int) -> torch.Tensor:
    """Over unprotected tokens: importance [B,M], metric [B,M,D] -> a score [B,M]
    whose top M - r_importance - r_similarity entries are the kept tokens."""
    m = importance.shape[-1]
    rank = descending_rank(importance)
    survivors = m - r_importance
    n_src = survivors // 2
    target = rank < survivors - n_src
    source = (rank >= survivors - n_src) & (rank < survivors)
    sim = cosine(metric, metric).masked_fill(~target[:, None, :], float("-inf")).amax(-1)
    sim = sim.masked_fill(~source, float("-inf"))
    similar = descending_rank(sim) < r_similarity
    keep = (rank < survivors) & ~similar
    return rank_to_score(rank, keep)


def check_counts(n: int, protect: int, r_imp: int, r_sim: int, where: str = "") -> None:
    m = n - protect
    survivors = m - r_imp
    if r_imp < 0 or r_sim < 0 or survivors < 1 or r_sim > survivors // 2 or protect + survivors - r_sim < 1:
        raise ScheduleError(
            f"{where}zero_tprune cannot prune r_importance={r_imp} then r_similarity={r_sim} of {m} unprotected "
            f"tokens (r_similarity can be at most half of the {max(survivors, 0)} tokens the I-stage keeps); lower them"
        )


class ZeroTPruneDrop(TokenDrop):
    """One Zero-TPrune step: I-stage then S-stage, one edgetok::token_drop."""

    def __init__(self, r_importance: int, r_similarity: int, protect_first: int, iterations: int):
        super().__init__(1, protect_first, False, score="zero_tprune")
        self.r_importance, self.r_similarity, self.iterations = int(r_importance), int(r_similarity), int(iterations)

    def extra_repr(self) -> str:
        return (f"r_importance={self.r_importance}, r_similarity={self.r_similarity}, "
                f"protect_first={self.protect_first}, iterations={self.iterations}")

    def tokens_after(self, n: int, where: str = "") -> int:
        check_counts(n, self.protect_first, self.r_importance, self.r_similarity, where)
        return n - self.r_importance - self.r_similarity

    def scores(self, x, ctx):
        p = self.protect_first
        importance = weighted_page_rank(attention_probs(ctx), self.iterations)[:, p:]
        return with_prefix(zero_tprune_score(importance, ctx.metric[:, p:], self.r_importance, self.r_similarity), p)

    def reduction_flops(self, n: int, dim: int) -> int:
        m = n - self.protect_first
        return 2 * n * n * dim + 2 * n * n * self.iterations + 2 * m * m * dim + 2 * m * m


@register_method("zero_tprune", "Zero-TPrune: weighted-PageRank importance pruning, then similarity pruning")
def build_zero_tprune(depth: int, tokens: int, protect: int, r_importance=4, r_similarity=4, iterations: int = 10,
                      protect_first=None) -> Plan:
    """``r_importance`` and ``r_similarity`` tokens pruned per layer (a number, one per layer, or 'linear:A:B')."""
    p = protect if protect_first is None else int(protect_first)
    if int(iterations) < 1:
        raise ScheduleError(f"zero_tprune iterations={iterations} must be >= 1")
    ri, rs = resolve_counts(r_importance, depth, "r_importance"), resolve_counts(r_similarity, depth, "r_similarity")
    reducers, n = [], tokens
    for i in range(depth):
        if ri[i] == 0 and rs[i] == 0:
            reducers.append(None)
            continue
        step = ZeroTPruneDrop(ri[i], rs[i], p, iterations)
        n = step.keep = step.tokens_after(n, f"layer {i}: ")  # the count reaching a layer is static
        reducers.append(step)
    params = {"r_importance": ri, "r_similarity": rs, "iterations": int(iterations), "protect_first": p}
    return Plan("zero_tprune", params, reducers)
