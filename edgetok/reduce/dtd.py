"""Differential token drop (DTD) for frame sequences.

Paper: Yao et al., "TimeChat-Online: 80% Visual Tokens are Naturally
Redundant in Streaming Videos", 2025 (arXiv:2504.17343).

Implemented: the feature-level DTD rule. Each frame's visual tokens are
compared with the same patch's token of the previous frame by cosine
similarity; a token whose change ``1 - cos`` is below ``threshold`` is dropped,
the first frame keeps everything. Two forms: a whole-clip form (all frames
at once, returns the kept tokens packed with their frame and patch indices, the
sequence a language model receives) and a stateful streaming form (one frame
at a time, remembering the previous frame's tokens). The paper's pixel-level
rule (L1 distance of corresponding patches) is offered as ``pixel_change``.

Departures: the threshold is on the change ``1 - cos`` rather than on the
similarity, so threshold 0 keeps every token; comparison is always against the
previous frame's tokens (as in the paper), not against the last kept token.
Tokens are dropped after the vision encoder, as in the paper: the encoder still
runs on every token (edgetok's streaming encoder is what skips that work). The
clip and streaming wrappers around an encoder are edgetok/patch/dtd.py.
"""
from __future__ import annotations

import torch


EPS = 1e-6


def token_change(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of corresponding tokens, [B,N], clamped to [0, 2] so
    that rounding never drops an unchanged token at threshold 0."""
    num = (x * prev).sum(-1)
    den = x.norm(dim=-1).clamp_min(EPS) * prev.norm(dim=-1).clamp_min(EPS)
    return (1.0 - num / den).clamp(0.0, 2.0)


def pixel_change(frame: torch.Tensor, prev: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean absolute pixel difference per patch [B, H/p * W/p] (row-major patches)."""
    d = (frame - prev).abs().mean(1, keepdim=True)
    return torch.nn.functional.avg_pool2d(d, patch).flatten(1)


def diff_drop(
    x: torch.Tensor,
    prev: torch.Tensor,
    threshold: float,
    protect_first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop tokens of ``x`` [B,N,C] that changed less than ``threshold`` since ``prev``.

    Returns (x [B,M,C], idx [B,M] int64, count [B] int64), M the largest count
    in the batch; kept tokens in original order, padding has idx -1 and zeros.
    """
    n, c = x.shape[1], x.shape[2]
    keep = token_change(x, prev) >= threshold
    if protect_first:
        keep = keep | (torch.arange(n, device=x.device) < protect_first)
    count = keep.sum(dim=1)
    m = int(count.max()) if x.shape[0] else 0
    pos = torch.arange(n, device=x.device)
    order = torch.where(keep, pos, pos + n).argsort(dim=1)[:, :m]
    valid = keep.gather(1, order)
    out = x.gather(1, order[..., None].expand(-1, -1, c)) * valid[..., None]
    idx = torch.where(valid, order, torch.full_like(order, -1))
    return out, idx, count
