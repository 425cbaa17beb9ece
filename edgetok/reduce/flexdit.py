"""FlexDiT: token density that changes across the layers and timesteps of a DiT.

Paper: Chang, Wang, Tang, Yang, "FlexDiT: Dynamic Token Density Control for
Diffusion Transformer", arXiv:2412.06028 (2024; v2 titled "SparseDiT: Token
Sparsification for Efficient Diffusion Transformer").

Implemented, training-free on a given DiT (edgetok.patch.dit.DiT):
- spatial density: a span of middle blocks ``sparse_layers=(start, end)``
  runs on *sparse tokens*, the dense token grid average-pooled by a factor f
  (f x f cells -> one token, the paper's SDTM "sparse tokens by adaptive
  pooling of the dense tokens"); the blocks before and after the span run on
  dense tokens (the paper's dense top segment);
- dense recovery: after the span every dense token adds its cell's sparse
  update (sparse output - sparse input, nearest upsampling), so the output
  grid is full size again;
- temporal density: ``stages`` map timesteps to pooling factors, coarse at
  high noise (early denoising) and finer as t falls, the paper's "more tokens
  in later timesteps"; f = 1 runs the span dense (the model's own forward).

Departures: the paper's bottom-segment Poolingformer (attention replaced by
pooled values) and its learned dense-recovery layers change the architecture
and need training, so they are not here; recovery is the training-free
residual upsampling above. The factor is read from ``t`` in eager mode (one
timestep per batch); for export and engines fix it with ``at_factor`` (one
static-shape model per density stage). The model side (the DiT forward that pools
and unpools around the span, ``flexdit`` and ``at_factor``) is edgetok/patch/dit.py.
No custom op: pooling to a fixed
grid is a static linear map that standard ONNX ops (Reshape + ReduceMean,
Expand) express, and neither TokenMerge (bipartite, data-dependent) nor
TokenDrop (selection) computes it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ScheduleError, UnsupportedModelError
from .base import Reducer
from .registry import Plan


def pool_tokens(x: torch.Tensor, grid: int, factor: int) -> torch.Tensor:
    """Average-pool raster tokens [B, grid*grid, C] over factor x factor cells -> [B, (grid/f)^2, C]."""
    b, _, c = x.shape
    g = grid // factor
    return x.view(b, g, factor, g, factor, c).mean(dim=(2, 4)).reshape(b, g * g, c)


def unpool_tokens(x: torch.Tensor, grid: int, factor: int) -> torch.Tensor:
    """Nearest upsampling of pooled tokens [B, (grid/f)^2, C] back to [B, grid*grid, C]."""
    b, _, c = x.shape
    g = grid // factor
    return x.view(b, g, 1, g, 1, c).expand(b, g, factor, g, factor, c).reshape(b, grid * grid, c)


class SparseSpan(Reducer):
    """Marks the first block of the sparse span: tokens go from n to n / f^2 (largest stage factor)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = int(factor)

    def tokens_after(self, n: int, where: str = "") -> int:
        return n // (self.factor * self.factor)

    def forward(self, x, size, ctx):
        raise UnsupportedModelError("FlexDiT runs on a DiT block stack, not an image ViT block: "
                                    "use edgetok.apply(dit_model, \"flexdit\")")


def check_stages(stages, grid: int):
    """``stages``: [(t_from, factor), ...]; sorted by t_from descending, last t_from must be 0."""
    out = sorted(((int(t), int(f)) for t, f in stages), reverse=True)
    if not out or out[-1][0] != 0:
        raise ScheduleError("FlexDiT stages must cover every timestep: the last stage needs t_from=0")
    for t, f in out:
        if f < 1 or grid % f:
            raise ScheduleError(f"FlexDiT factor {f} (stage t>={t}) must divide the token grid side {grid}")
    return out


def factor_for(stages, t: torch.Tensor) -> int:
    """The pooling factor of timestep ``t`` (all samples of a batch must share it)."""
    t = t.reshape(-1)
    lo, hi = int(t.min()), int(t.max())
    if lo != hi:
        raise ScheduleError(f"FlexDiT needs one timestep per batch (got {lo}..{hi}); split the batch")
    return next(f for t_from, f in stages if hi >= t_from)


def build_flexdit(depth: int, tokens: int, protect: int = 0, grid: int = 0, sparse_layers=None,
                  stages: Sequence = ((500, 2), (0, 1))) -> Plan:
    """``sparse_layers=(start, end)``: blocks run on pooled tokens (default the middle
    half); ``stages``: (t_from, factor) pairs, e.g. ((700, 4), (300, 2), (0, 1))."""
    start, end = sparse_layers if sparse_layers is not None else (depth // 4, depth - depth // 4)
    if not 0 <= start < end <= depth:
        raise ScheduleError(f"FlexDiT sparse_layers=({start}, {end}) must satisfy 0 <= start < end <= {depth}")
    stages = check_stages(stages, grid)
    reducers = [SparseSpan(max(f for _, f in stages)) if i == start else None for i in range(depth)]
    plan = Plan("flexdit", {"sparse_layers": (start, end), "stages": stages, "grid": grid}, reducers)
    plan.summary["factor_for"] = lambda t: factor_for(stages, t)
    return plan
