"""DyMU dynamic token merging: bipartite merging by per-layer similarity thresholds.

Paper: Wang et al., "DyMU: Dynamic Merging and Virtual Unmerging for
Efficient VLMs", 2025 (arXiv:2504.17040).

Implemented: the Dynamic Token Merging (DToMe) part. Each layer uses ToMe's
bipartite split and metric, but instead of a fixed r it merges every A token
whose best B match has cosine similarity above the layer's threshold, so the
token count depends on the image. Thresholds are given per layer or
calibrated from sample images the way the paper does it: for a target merge
count r_l, the threshold is the batch mean of each image's r_l-th highest
match score (``calibrate`` in edgetok/tune/calibrate.py).

Inside a batch, images keep different counts: outputs are padded to the batch
maximum; padding tokens have size 0 (so proportional attention's log(size) is
-inf and they take no part in attention) and zero features. The count per
image is an output.

Not implemented: Virtual Token Unmerging (the language-model side of DyMU);
edgetok reduces the vision encoder only. Departures as for ToMe (protected
leading tokens, fixed output order, stable ties).
"""
from __future__ import annotations

import torch

from .base import Reducer
from .registry import Plan, register_method
from .schedule import resolve
from .tome import similarity, split_counts

EPS_SIZE = 1e-6


def threshold_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor,
    threshold: float,
    protect_first: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge every A token whose best-match similarity exceeds ``threshold``.

    ``size`` [B,N,1] is 0 on padding. Returns (x [B,M,C], size [B,M,1],
    count [B] int64) where M is the largest count in the batch; each image's
    valid tokens come first, in the order [protected, unmerged A, B].
    """
    b, n, c = x.shape
    _, _, pa, pb = split_counts(n, protect_first)
    valid = size[..., 0] > 0
    scores = similarity(metric, protect_first)
    a_valid, b_valid = valid[:, ::2], valid[:, 1::2]
    scores = scores.masked_fill(~(a_valid[:, :, None] & b_valid[:, None, :]), float("-inf"))
    node_max, node_idx = scores.max(dim=-1)
    merged = node_max > threshold

    a_x, b_x = x[:, ::2], x[:, 1::2]
    a_s, b_s = size[:, ::2], size[:, 1::2]
    w = (a_s * merged[..., None]).to(x.dtype)
    dst_c = node_idx[..., None].expand(-1, -1, c)
    b_sum = (b_x * b_s).scatter_add(1, dst_c, a_x * w)
    b_size = b_s.scatter_add(1, node_idx[..., None], w)
    b_new = b_sum / b_size.clamp_min(EPS_SIZE)

    k = protect_first
    cand_x = torch.cat([x[:, :k], a_x[:, pa:], b_new[:, pb:]], dim=1)
    cand_s = torch.cat([size[:, :k], a_s[:, pa:], b_size[:, pb:]], dim=1)
    cand_valid = torch.cat([valid[:, :k], a_valid[:, pa:] & ~merged[:, pa:], b_valid[:, pb:]], dim=1)
    count = cand_valid.sum(dim=1)
    m = int(count.max()) if b else 0
    pos = torch.arange(cand_valid.shape[1], device=x.device)
    key = torch.where(cand_valid, pos, pos + cand_valid.shape[1])
    order = key.argsort(dim=1)[:, :m]
    keep = cand_valid.gather(1, order)[..., None]
    out = cand_x.gather(1, order[..., None].expand(-1, -1, c)) * keep
    out_size = cand_s.gather(1, order[..., None]) * keep
    return out, out_size, count



def match_scores(metric: torch.Tensor, size: torch.Tensor, protect_first: int) -> torch.Tensor:
    """Best-match similarity of every mergeable A token [B, Na-pa] (-inf on padding)."""
    valid = size[..., 0] > 0
    scores = similarity(metric, protect_first)
    scores = scores.masked_fill(~(valid[:, ::2, None] & valid[:, None, 1::2]), float("-inf"))
    _, _, pa, _ = split_counts(metric.shape[1], protect_first)
    return scores.max(dim=-1).values[:, pa:]


class ThresholdMerge(Reducer):
    """One DyMU step: merge every pair above ``threshold`` (edgetok::threshold_merge)."""

    adaptive = True

    def __init__(self, threshold: float, protect_first: int):
        super().__init__()
        self.threshold, self.protect_first = float(threshold), int(protect_first)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}, protect_first={self.protect_first}"

    def tokens_after(self, n: int, where: str = "") -> int:
        return n  # upper bound: nothing above the threshold

    def reduction_flops(self, n: int, dim: int) -> int:
        return 2 * ((n + 1) // 2) * (n // 2) * dim + 3 * n * dim

    def forward(self, x, size, ctx):
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        out, out_size, _ = torch.ops.edgetok.threshold_merge(x, ctx.metric, size, self.threshold, self.protect_first)
        return out, out_size


@register_method("dymu", "DyMU dynamic merging: per-layer similarity thresholds, image-dependent token count")
def build_dymu(depth: int, tokens: int, protect: int, threshold=0.9, prop_attn: bool = True, protect_first=None) -> Plan:
    p = protect if protect_first is None else int(protect_first)
    thresholds = resolve(threshold, depth, "threshold")
    reducers = [ThresholdMerge(t, p) if t < 1.0 else None for t in thresholds]
    params = {"threshold": [float(t) for t in thresholds], "prop_attn": prop_attn, "protect_first": p}
    return Plan("dymu", params, reducers, prop_attn=prop_attn, adaptive=True)
