"""MustDrop: merge similar neighbouring tokens early, drop unimportant ones later.

Paper: Liu, Wang, Chen, Wen, Wang, Ou, Zhang, "Multi-Stage Vision Token
Dropping: Towards Efficient Multimodal Large Language Model", 2024
(arXiv:2411.10803).

Implemented (the vision-encoder part, as two stages inside a ViT):
- spatial merge stage, at ``merge_layer``: the patch grid is cut into
  horizontal neighbour pairs (columns 2c and 2c+1 of each row); the
  ``merge_r`` pairs whose tokens are most similar (cosine of the attention keys
  averaged over heads) merge into one token at the left position
  (size-weighted mean, sizes add);
- drop stage, at ``drop_layers``: keep ``keep_rate`` of the tokens by class-token
  attention (mean attention received without a class token), EViT-style.
Merged tokens carry their size, and attention adds log(size) (proportional
attention) so a merged pair weighs as much as its two patches.

Departures: MustDrop merges tokens in local windows whose similarity passes a
threshold (an image-dependent count); edgetok merges a fixed count of 1x2
neighbour pairs so shapes stay static. MustDrop's later stages work inside
the language model (text-guided dual-attention filtering at prefill, an
output-aware KV-cache policy at decoding); with no language model here the
drop stage uses the vision tower's own class-token attention.

Export: both stages are one edgetok::token_drop each — the merge first writes
each chosen pair's mean into its left token (Gather from [x; pair means]),
then drops the right tokens. No new op.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ScheduleError
from .base import Reducer
from .drop import TokenDrop
from .registry import Plan, register_method
from .schedule import keep_from_rate
from .scored import descending_rank, square_grid


def neighbour_pairs(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch indices (row-major) of the left and right token of every 1x2 pair."""
    gh, gw = grid
    left = (torch.arange(gh)[:, None] * gw + 2 * torch.arange(gw // 2)[None, :]).flatten()
    return left, left + 1


def pair_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, protect_first: int,
               left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the ``r`` most similar neighbour pairs (patch indices ``left``/``right``)."""
    b, n, c = x.shape
    p = protect_first
    left, right = left.to(x.device) + p, right.to(x.device) + p
    mn = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = (mn[:, left] * mn[:, right]).sum(-1)  # [B,P]
    chosen = descending_rank(sim) < r
    s_l, s_r = size[:, left], size[:, right]
    mean = (x[:, left] * s_l + x[:, right] * s_r) / (s_l + s_r)
    pos = torch.arange(n, device=x.device)
    pair_of = (pos[:, None] == left[None, :]).to(torch.int64).argmax(-1)  # pair index of each left token
    is_left = (pos[:, None] == left[None, :]).any(-1)
    is_right = (pos[:, None] == right[None, :]).any(-1)
    pair_of_right = (pos[:, None] == right[None, :]).to(torch.int64).argmax(-1)
    take = is_left[None, :] & chosen.gather(1, pair_of[None, :].expand(b, -1))  # [B,N] left token becomes the mean
    src = torch.where(take, n + pair_of[None, :], pos[None, :])
    x_all = torch.cat([x, mean], dim=1)
    s_all = torch.cat([size, s_l + s_r], dim=1)
    x = x_all.gather(1, src[..., None].expand(-1, -1, c))
    size = s_all.gather(1, src[..., None])
    gone = is_right[None, :] & chosen.gather(1, pair_of_right[None, :].expand(b, -1))
    score = torch.where(gone, -1.0, 0.0).to(x.dtype)
    out, idx = torch.ops.edgetok.token_drop(x, score, n - r, p, 0)
    return out, size.gather(1, idx[..., None])


class PairMerge(Reducer):
    """MustDrop's spatial merge stage over an intact ``grid`` of patches."""

    def __init__(self, r: int, protect_first: int, grid: tuple[int, int]):
        super().__init__()
        self.r, self.protect_first, self.grid = int(r), int(protect_first), tuple(grid)
        left, right = neighbour_pairs(self.grid)
        self.register_buffer("left", left, persistent=False)
        self.register_buffer("right", right, persistent=False)

    def extra_repr(self) -> str:
        return f"r={self.r}, protect_first={self.protect_first}, grid={self.grid}"

    def tokens_after(self, n: int, where: str = "") -> int:
        gh, gw = self.grid
        if n != self.protect_first + gh * gw:
            raise ScheduleError(f"{where}mustdrop's merge stage needs the whole {gh}x{gw} patch grid, got {n} tokens")
        if not 0 <= self.r <= gh * (gw // 2):
            raise ScheduleError(
                f"{where}mustdrop merge_r={self.r}: a {gh}x{gw} grid has {gh * (gw // 2)} neighbour pairs; lower merge_r"
            )
        return n - self.r

    def reduction_flops(self, n: int, dim: int) -> int:
        pairs = self.left.shape[0]
        return 2 * pairs * dim + pairs * pairs + 3 * n * dim

    def forward(self, x, size, ctx):
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        return pair_merge(x, ctx.metric, size, self.r, self.protect_first, self.left, self.right)


@register_method("mustdrop", "MustDrop: merge similar neighbour pairs early, drop by class attention later")
def build_mustdrop(depth: int, tokens: int, protect: int, merge_r: int = 8, merge_layer: int = 0,
                   keep_rate: float = 0.7, drop_layers=None, grid=None, prop_attn: bool = True, protect_first: Optional[int] = None) -> Plan:
    """``merge_r`` neighbour pairs merged at ``merge_layer``; ``keep_rate`` kept at
    each of ``drop_layers`` (default: the middle layer)."""
    p = protect if protect_first is None else int(protect_first)
    grid = square_grid(tokens - p, "mustdrop") if grid is None else (int(grid[0]), int(grid[1]))
    if grid[0] * grid[1] != tokens - p:
        raise ScheduleError(f"mustdrop grid={grid} has {grid[0] * grid[1]} patches but the model has {tokens - p}")
    if drop_layers is None:
        drop_layers = [depth // 2]
    drop_layers = [drop_layers] if isinstance(drop_layers, int) else list(drop_layers)
    bad = [i for i in [merge_layer, *drop_layers] if not 0 <= i < depth]
    if bad:
        raise ScheduleError(f"mustdrop layers {bad} are outside the model's {depth} layers")
    if any(i <= merge_layer for i in drop_layers):
        raise ScheduleError(f"mustdrop drop_layers {drop_layers} must come after merge_layer={merge_layer}")
    reducers: list = [None] * depth
    n = tokens
    score = "cls_attn" if p >= 1 else "mean_attn"
    for i in range(depth):
        step = None
        if i == merge_layer and merge_r:
            step = PairMerge(merge_r, p, grid)
        elif i in drop_layers:
            keep = keep_from_rate(n, keep_rate, p)
            step = TokenDrop(keep, p, False, score) if keep < n else None
        if step is not None:
            n = step.tokens_after(n, f"layer {i}: ")
            reducers[i] = step
    params = {"merge_r": merge_r, "merge_layer": merge_layer, "keep_rate": keep_rate, "drop_layers": drop_layers,
              "grid": grid, "prop_attn": prop_attn, "protect_first": p}
    return Plan("mustdrop", params, reducers, prop_attn=prop_attn)
