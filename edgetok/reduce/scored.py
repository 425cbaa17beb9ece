"""What the selection methods (DivPrune, HiRED, Zero-TPrune, MustDrop, the VLM
output stage) share: exact ranks without sorting, turning a chosen subset into a
score for edgetok::token_drop, full attention probabilities, and the keep schedule.

Every selection method here ends in one edgetok::token_drop whose score puts the
method's chosen tokens first, so the ONNX graph keeps one TokenDrop node per
step and the method-specific scoring stays standard ops with static shapes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import ScheduleError
from .base import AttentionContext
from .schedule import keep_from_rate, resolve_counts


def descending_rank(score: torch.Tensor, group: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rank of every entry of ``score`` [B,M] in descending order, ties to the
    lower index (0 = best), as int64; with ``group`` [M] the rank within the
    entry's group. Counts, per entry, the entries ahead of it: O(M^2)
    comparisons, no sort, so ONNX gets plain Greater/Equal/ReduceSum."""
    m = score.shape[-1]
    idx = torch.arange(m, device=score.device)
    ahead = (score[..., None, :] > score[..., :, None]) | (
        (score[..., None, :] == score[..., :, None]) & (idx[None, :] < idx[:, None])
    )
    if group is not None:
        ahead = ahead & (group[:, None] == group[None, :])
    return ahead.sum(-1)


def rank_to_score(rank: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """token_drop score [B,M] that ranks the ``chosen`` tokens first (by ``rank``)
    and the others after them (by ``rank``). Integer-valued, so exact in fp32."""
    m = rank.shape[-1]
    base = (m - rank).to(torch.float32)
    return torch.where(chosen, base + m, base)


def with_prefix(score: torch.Tensor, protect: int) -> torch.Tensor:
    """Prepend ``protect`` columns for the protected tokens (token_drop keeps them anyway)."""
    if not protect:
        return score
    return torch.cat([score.new_full((score.shape[0], protect), float("inf")), score], dim=1)


def attention_probs(ctx: AttentionContext) -> torch.Tensor:
    """The block's full attention probabilities [B,H,N,N] (what the graph methods need)."""
    logits = (ctx.q @ ctx.k.transpose(-1, -2)) * ctx.scale
    if ctx.bias is not None:
        logits = logits + ctx.bias
    return logits.softmax(-1)


def cosine(u: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Cosine similarity of every row of ``u`` [B,M,D] to every row of ``v`` [B,K,D]."""
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(eps)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(eps)
    return u @ v.transpose(-1, -2)


def keep_counts(depth: int, tokens: int, protect: int, keep_rate=None, r=None, layers=None,
                method: str = "") -> list[Optional[int]]:
    """Tokens kept after each layer (None: no step there), from ``r`` tokens
    removed per layer or ``keep_rate`` at ``layers`` (EViT-style), checked
    against the tokens reaching each layer."""
    if (keep_rate is None) == (r is None):
        raise ScheduleError(f"{method} needs exactly one of keep_rate= (with layers=) or r=")
    if keep_rate is not None:
        if layers is None:
            layers = [i for i in range(depth) if i % 3 == 0 and 0 < i < depth - 1] or [0]
        layers = [layers] if isinstance(layers, int) else list(layers)
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ScheduleError(f"{method} layers {bad} are outside the model's {depth} layers")
    else:
        rs = resolve_counts(r, depth, "r")
    keeps, n = [], tokens
    for i in range(depth):
        keep = (keep_from_rate(n, keep_rate, protect) if i in layers else n) if keep_rate is not None else n - rs[i]
        if keep < max(protect, 1) or keep > n:
            raise ScheduleError(
                f"{method} layer {i}: cannot keep {keep} of {n} tokens (at least {max(protect, 1)}, "
                f"the {protect} protected tokens included); lower r or raise keep_rate"
            )
        keeps.append(None if keep == n else keep)
        n = keep
    return keeps


def square_grid(patches: int, method: str) -> tuple[int, int]:
    """(rows, cols) of a square patch grid, for methods that need the image layout."""
    side = int(math.isqrt(patches))
    if side * side != patches:
        raise ScheduleError(
            f"{method} needs the patch grid; {patches} patch tokens are not a square grid: pass grid=(rows, cols)"
        )
    return side, side
