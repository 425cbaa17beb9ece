"""The edgetok custom ops: one torch.library op per reduction step.

Every reduced model calls these, so the exporters see one opaque node per
step (which becomes one ``edgetok`` ONNX node and one TensorRT plugin). The
CPU/CUDA implementation is the pure-torch reference in ``edgetok.reduce``;
the fused CUDA kernels (plugins/) register over it where they are built.
Fake implementations give the exporters output shapes: static for
token_merge and token_drop, a data-dependent size for the adaptive ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reduce.drop import top_k_drop
from ..reduce.dtd import diff_drop as _diff_drop
from ..reduce.dymu import threshold_merge as _threshold_merge
from ..reduce.tome import bipartite_merge


def _own(t: Tensor, like: Tensor) -> Tensor:
    # custom ops may not return their inputs (aliasing); copy only when that happens
    return t.clone() if t is like else t


def _bound(n):
    # after an earlier adaptive step n is itself data-dependent (a SymInt), which
    # new_dynamic_size does not accept as a bound: leave the size unbounded then
    return n if isinstance(n, int) else None


@torch.library.custom_op("edgetok::token_merge", mutates_args=())
def token_merge(x: Tensor, metric: Tensor, size: Tensor, r: int, protect_first: int) -> tuple[Tensor, Tensor]:
    """ToMe bipartite soft matching: [B,N,C] -> [B,N-r,C] plus sizes [B,N-r,1]."""
    out, out_size = bipartite_merge(x, metric, size, r, protect_first)
    return _own(out, x), _own(out_size, size)


@token_merge.register_fake
def _(x, metric, size, r, protect_first):
    b, n, c = x.shape
    return x.new_empty(b, n - r, c), size.new_empty(b, n - r, 1)


@torch.library.custom_op("edgetok::token_drop", mutates_args=())
def token_drop(x: Tensor, score: Tensor, keep: int, protect_first: int, fuse_dropped: int) -> tuple[Tensor, Tensor]:
    """Top-k keep (EViT): [B,N,C] -> [B,keep(+1),C] plus kept indices [B,keep]."""
    out, idx = top_k_drop(x, score, keep, protect_first, bool(fuse_dropped))
    return _own(out, x), idx


@token_drop.register_fake
def _(x, score, keep, protect_first, fuse_dropped):
    b, _, c = x.shape
    return x.new_empty(b, keep + (1 if fuse_dropped else 0), c), x.new_empty(b, keep, dtype=torch.int64)


@torch.library.custom_op("edgetok::threshold_merge", mutates_args=())
def threshold_merge(
    x: Tensor, metric: Tensor, size: Tensor, threshold: float, protect_first: int
) -> tuple[Tensor, Tensor, Tensor]:
    """DyMU threshold merging: padded [B,M,C], sizes [B,M,1] (0 = padding), count [B]."""
    return _threshold_merge(x, metric, size, threshold, protect_first)


@threshold_merge.register_fake
def _(x, metric, size, threshold, protect_first):
    b, n, c = x.shape
    m = torch.library.get_ctx().new_dynamic_size(min=0, max=_bound(n))
    return x.new_empty(b, m, c), size.new_empty(b, m, 1), x.new_empty(b, dtype=torch.int64)


@torch.library.custom_op("edgetok::diff_drop", mutates_args=())
def diff_drop(x: Tensor, prev: Tensor, threshold: float, protect_first: int) -> tuple[Tensor, Tensor, Tensor]:
    """DTD: tokens that changed since ``prev``, padded [B,M,C], idx [B,M] (-1 = padding), count [B]."""
    return _diff_drop(x, prev, threshold, protect_first)


@diff_drop.register_fake
def _(x, prev, threshold, protect_first):
    b, n, c = x.shape
    m = torch.library.get_ctx().new_dynamic_size(min=0, max=_bound(n))
    return x.new_empty(b, m, c), x.new_empty(b, m, dtype=torch.int64), x.new_empty(b, dtype=torch.int64)
