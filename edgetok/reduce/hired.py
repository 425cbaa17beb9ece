"""HiRED: a token budget per image partition from class-token attention, then
the top tokens inside each partition.

Paper: Arif, Yoon, Nikolopoulos, Vandierendonck, John, Ji, "HiRED:
Attention-Guided Token Dropping for Efficient Inference of High-Resolution
Vision-Language Models", AAAI 2025 (arXiv:2408.10945).

Implemented: the patch grid is cut into ``partitions`` = (rows, cols)
rectangular parts (HiRED's partitions are the sub-images of a high-resolution
input). Each part's share of the budget is its share of the class token's
attention (averaged over heads); budget_p = floor(share_p * budget), at most
the part's size. Inside each part the tokens with the highest class-token
attention are kept. Tokens the flooring leaves unassigned go to the highest
remaining class-token attention over the whole image, so the kept count is
exactly the budget (static). Models without a class token use the mean
attention each token receives.

Departures: HiRED takes the budget distribution from an early layer's
attention and the selection from the final layer's; here both use the
attention of the block the step sits in (inside a ViT, method ``hired``:
between that block's attention and MLP; as the VLM output stage,
``vlm_output.py``: the feature layer). The rounding of budgets and the
leftover rule are edgetok's (the paper does not fix them).

Export: budgets and within-part ranks are standard ops (MatMul with a constant
part one-hot, Floor, pairwise Greater/Equal counts); the selection is one
edgetok::token_drop. No new op.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ScheduleError
from .drop import TokenDrop
from .registry import Plan, register_method
from .schedule import keep_from_rate
from .scored import descending_rank, rank_to_score, square_grid, with_prefix


def partition_ids(grid: tuple[int, int], partitions: tuple[int, int]) -> torch.Tensor:
    """Part index of every patch (row-major grid) for ``partitions`` = (rows, cols) parts."""
    gh, gw = grid
    ph, pw = partitions
    rows = torch.arange(gh) * ph // gh
    cols = torch.arange(gw) * pw // gw
    return (rows[:, None] * pw + cols[None, :]).flatten()


def hired_score(attn: torch.Tensor, picks: int, part: torch.Tensor, parts: int) -> torch.Tensor:
    """HiRED selection over patch tokens with attention ``attn`` [B,M]: a score [B,M]
    whose top ``picks`` are the kept tokens."""
    part = part.to(attn.device)
    onehot = (part[:, None] == torch.arange(parts, device=attn.device)[None, :]).to(attn.dtype)  # [M,P]
    share = attn @ onehot
    share = share / share.sum(-1, keepdim=True).clamp_min(1e-12)
    budget = torch.minimum(torch.floor(share * picks), onehot.sum(0))  # [B,P]
    tok_budget = budget @ onehot.transpose(0, 1)  # each token's part budget [B,M]
    chosen = descending_rank(attn, part).to(attn.dtype) < tok_budget
    return rank_to_score(descending_rank(attn), chosen)


class HiREDDrop(TokenDrop):
    """One HiRED step over a ``grid`` of patches (the grid must be intact here)."""

    def __init__(self, keep: int, protect_first: int, grid: tuple[int, int], partitions: tuple[int, int]):
        super().__init__(keep, protect_first, False, score="hired")
        self.grid, self.partitions = tuple(grid), tuple(partitions)
        self.register_buffer("part", partition_ids(self.grid, self.partitions), persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grid={self.grid}, partitions={self.partitions}"

    def tokens_after(self, n: int, where: str = "") -> int:
        if n != self.protect_first + self.grid[0] * self.grid[1]:
            raise ScheduleError(
                f"{where}hired needs the whole {self.grid[0]}x{self.grid[1]} patch grid but {n} tokens reach it; "
                "put hired before any other reduction"
            )
        return super().tokens_after(n, where)

    def scores(self, x, ctx):
        p = self.protect_first
        attn = (ctx.cls_attn if p >= 1 else ctx.mean_attn)[:, p:]
        return with_prefix(hired_score(attn, self.keep - p, self.part, self.partitions[0] * self.partitions[1]), p)

    def reduction_flops(self, n: int, dim: int) -> int:
        m = n - self.protect_first
        attn = 2 * n * dim if self.protect_first else 2 * n * n * dim
        return attn + 2 * m * m


def check_partitions(partitions, grid) -> tuple[int, int]:
    parts = (int(partitions), int(partitions)) if isinstance(partitions, int) else tuple(int(v) for v in partitions)
    if len(parts) != 2 or min(parts) < 1 or parts[0] > grid[0] or parts[1] > grid[1]:
        raise ScheduleError(
            f"partitions={partitions!r} must be (rows, cols) with 1 <= rows <= {grid[0]} and 1 <= cols <= {grid[1]}"
        )
    return parts


@register_method("hired", "HiRED: class-attention budget per image partition, top tokens inside each partition")
def build_hired(depth: int, tokens: int, protect: int, keep_rate: float = 0.5, layer: Optional[int] = None,
                partitions=(2, 2), grid=None, protect_first=None) -> Plan:
    """Keep ``keep_rate`` of the patch tokens at ``layer`` (default: the middle layer),
    split into ``partitions`` = (rows, cols) parts of the ``grid`` (default: square)."""
    p = protect if protect_first is None else int(protect_first)
    layer = depth // 2 if layer is None else int(layer)
    if not 0 <= layer < depth:
        raise ScheduleError(f"hired layer={layer} is outside the model's {depth} layers")
    grid = square_grid(tokens - p, "hired") if grid is None else (int(grid[0]), int(grid[1]))
    if grid[0] * grid[1] != tokens - p:
        raise ScheduleError(f"hired grid={grid} has {grid[0] * grid[1]} patches but the model has {tokens - p}")
    parts = check_partitions(partitions, grid)
    keep = keep_from_rate(tokens, keep_rate, p)
    step = HiREDDrop(keep, p, grid, parts) if keep < tokens else None
    if step is not None:
        step.tokens_after(tokens, f"layer {layer}: ")
    reducers = [step if i == layer else None for i in range(depth)]
    params = {"keep_rate": keep_rate, "layer": layer, "partitions": parts, "grid": grid, "protect_first": p}
    return Plan("hired", params, reducers)
