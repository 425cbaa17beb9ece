"""Top-k token dropping (keep the highest-scoring tokens), with EViT's fused token.

Papers: Liang et al., "Not All Patches are What You Need: Expediting Vision
Transformers via Token Reorganizations" (EViT), ICLR 2022 (arXiv:2202.07800);
plain top-k keep as in DynamicViT/EViT ablations.

Implemented: between a block's attention and its MLP, keep the ``keep`` tokens
with the highest score (EViT's score is the class token's attention to each
token, averaged over heads), in their original order; optionally append one
fused token, the score-weighted mean of the dropped tokens (EViT's
"inattentive token fusion").

Departures: ``protect_first`` keeps the first K tokens (class + registers)
whatever their score, and counts them inside ``keep``. For models without a
class token the adapters score by the mean attention each token receives, or by
a user-given score function. The fused token's weights are the scores as given,
so they should be non-negative (attention probabilities are). Ties break
towards the lower index. No training-time parts (EViT's keep-rate warm-up).
"""
from __future__ import annotations

import torch

from ..errors import ScheduleError
from .base import Reducer
from .registry import Plan, register_method
from .schedule import keep_from_rate, resolve_counts

EPS = 1e-6


def check_keep(n: int, keep: int, protect_first: int, where: str = "") -> None:
    if keep > n or keep < max(protect_first, 1):
        raise ScheduleError(
            f"{where}cannot keep {keep} of {n} tokens (keep must be between "
            f"{max(protect_first, 1)} and {n}, the {protect_first} protected tokens included)"
        )


def top_k_drop(
    x: torch.Tensor,
    score: torch.Tensor,
    keep: int,
    protect_first: int = 1,
    fuse_dropped: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``keep`` tokens of ``x`` [B,N,C] by ``score`` [B,N].

    Returns (x [B,keep(+1),C], kept indices [B,keep] in ascending order).
    """
    n, c = x.shape[1], x.shape[2]
    check_keep(n, keep, protect_first)
    ranked = score
    if protect_first:
        protected = torch.arange(n, device=score.device) < protect_first
        ranked = score.masked_fill(protected, float("inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    idx = order[:, :keep].sort(dim=-1).values
    out = x.gather(1, idx[..., None].expand(-1, -1, c))
    if fuse_dropped:
        dropped = order[:, keep:]
        w = score.gather(1, dropped)[..., None]
        xd = x.gather(1, dropped[..., None].expand(-1, -1, c))
        fused = (w * xd).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(EPS)
        out = torch.cat([out, fused], dim=1)
    return out, idx


SCORES = ("cls_attn", "mean_attn", "norm")


class TokenDrop(Reducer):
    """One top-k step: keep ``keep`` tokens by score (edgetok::token_drop)."""

    def __init__(self, keep: int, protect_first: int, fuse_dropped: bool, score="cls_attn"):
        super().__init__()
        self.keep, self.protect_first, self.fuse_dropped = int(keep), int(protect_first), bool(fuse_dropped)
        self.score = score

    def extra_repr(self) -> str:
        s = self.score if isinstance(self.score, str) else getattr(self.score, "__name__", "custom")
        return f"keep={self.keep}, protect_first={self.protect_first}, fuse_dropped={self.fuse_dropped}, score={s}"

    def tokens_after(self, n: int, where: str = "") -> int:
        check_keep(n, self.keep, self.protect_first, where)
        return self.keep + int(self.fuse_dropped)

    def reduction_flops(self, n: int, dim: int) -> int:
        extra = 2 * n * dim if self.score == "cls_attn" else (2 * n * n * dim if self.score == "mean_attn" else 0)
        return extra + n * dim * int(self.fuse_dropped) * 2

    def scores(self, x, ctx):
        if callable(self.score):
            return self.score(x, ctx)
        if self.score == "norm":
            return x.norm(dim=-1)
        return getattr(ctx, self.score)

    def forward(self, x, size, ctx):
        score = self.scores(x, ctx)
        out, idx = torch.ops.edgetok.token_drop(x, score, self.keep, self.protect_first, int(self.fuse_dropped))
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        kept = size.gather(1, idx[..., None])
        if self.fuse_dropped:
            kept = torch.cat([kept, size.sum(1, keepdim=True) - kept.sum(1, keepdim=True)], dim=1)
        return out, kept


@register_method("drop", "top-k token dropping by class-token attention (EViT), optional fused token")
def build_drop(
    depth: int,
    tokens: int,
    protect: int,
    keep_rate=None,
    r=None,
    layers=None,
    fuse_dropped: bool = False,
    score=None,
    protect_first=None,
) -> Plan:
    """``r`` tokens dropped per layer (a schedule), or ``keep_rate`` at ``layers``
    (EViT: 0.7 at layers 3, 6, 9 of a 12-layer model)."""
    p = protect if protect_first is None else int(protect_first)
    score = score or ("cls_attn" if protect >= 1 else "mean_attn")
    if isinstance(score, str) and score not in SCORES:
        raise ScheduleError(f"unknown drop score {score!r}; use one of {', '.join(SCORES)} or a callable")
    if (keep_rate is None) == (r is None):
        raise ScheduleError("drop needs exactly one of keep_rate= (with layers=) or r=")
    if keep_rate is not None:
        if layers is None:
            layers = [i for i in range(depth) if i % 3 == 0 and 0 < i < depth - 1] or [0]
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ScheduleError(f"drop layers {bad} are outside the model's {depth} layers")
        rates = [keep_rate if i in set(layers) else 1.0 for i in range(depth)]
    else:
        rs = resolve_counts(r, depth, "r")
    reducers, n = [], tokens
    for i in range(depth):
        keep = keep_from_rate(n, rates[i], p) if keep_rate is not None else n - rs[i]
        if keep == n:
            reducers.append(None)
            continue
        step = TokenDrop(keep, p, fuse_dropped, score)
        n = step.tokens_after(n, f"layer {i}: ")
        reducers.append(step)
    params = {"keep_rate": keep_rate, "layers": layers} if keep_rate is not None else {"r": rs}
    params.update(fuse_dropped=fuse_dropped, score=score if isinstance(score, str) else "custom", protect_first=p)
    return Plan("drop", params, reducers)
