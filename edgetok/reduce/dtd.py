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
runs on every token (edgetok's streaming encoder is what skips that work).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ScheduleError
from .registry import register_method

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


@dataclass
class DTDOutput:
    """Kept visual tokens of a clip, packed: what a language model receives."""

    tokens: torch.Tensor  # [K, C]
    frame_index: torch.Tensor  # [K] frame of each kept token
    token_index: torch.Tensor  # [K] position of each kept token in its frame's token sequence
    kept_per_frame: torch.Tensor  # [T]


def _encode(model, frames: torch.Tensor) -> torch.Tensor:
    from ..patch import adapter_for
    from ..patch.base import run_blocks

    adapter = adapter_for(model)
    return run_blocks(adapter, model, adapter.embed(model, frames))[0]


class _DTDBase(nn.Module):
    def __init__(self, model: nn.Module, threshold: float, mode: str):
        super().__init__()
        from ..patch import adapter_for

        if mode not in ("feature", "pixel"):
            raise ScheduleError(f"dtd mode must be 'feature' or 'pixel', not {mode!r}")
        if threshold < 0:
            raise ScheduleError(f"dtd threshold={threshold} must be >= 0 (0 keeps every token)")
        info = adapter_for(model).info(model)
        self.encoder = copy.deepcopy(model)
        self.threshold, self.mode = float(threshold), mode
        self.num_prefix, self.patch_size = info.num_prefix, info.patch_size

    def _keep_mask(self, frames, feats, prev_frames, prev_feats) -> torch.Tensor:
        """[B,N] tokens to keep, comparing with the previous frame."""
        if self.mode == "feature":
            keep = token_change(feats, prev_feats) >= self.threshold
        else:
            patches = pixel_change(frames, prev_frames, self.patch_size) >= self.threshold
            prefix = patches.new_ones(patches.shape[0], self.num_prefix)
            keep = torch.cat([prefix, patches], dim=1)
        keep[:, : self.num_prefix] = True
        return keep


class DTDClip(_DTDBase):
    """Whole-clip DTD: ``forward(frames [T,C,H,W]) -> DTDOutput``."""

    def forward(self, frames: torch.Tensor) -> DTDOutput:
        feats = _encode(self.encoder, frames)
        t, n, _ = feats.shape
        keep = torch.ones(t, n, dtype=torch.bool, device=feats.device)
        if t > 1:
            keep[1:] = self._keep_mask(frames[1:], feats[1:], frames[:-1], feats[:-1])
        frame_index, token_index = keep.nonzero(as_tuple=True)
        return DTDOutput(feats[keep], frame_index, token_index, keep.sum(1))


class DTDStream(_DTDBase):
    """Streaming DTD: call once per frame batch [B,C,H,W] (B parallel streams);
    keeps the previous frame as state. Returns (tokens [B,M,C] zero-padded,
    idx [B,M] with -1 on padding, count [B]) through edgetok::diff_drop."""

    def __init__(self, model, threshold, mode):
        super().__init__(model, threshold, mode)
        self.prev_frames: Optional[torch.Tensor] = None
        self.prev_feats: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.prev_frames = self.prev_feats = None

    def forward(self, frames: torch.Tensor):
        feats = _encode(self.encoder, frames)
        prev_frames, prev_feats = self.prev_frames, self.prev_feats
        self.prev_frames, self.prev_feats = frames, feats
        if prev_feats is None:
            b, n = feats.shape[:2]
            idx = torch.arange(n, device=feats.device).expand(b, n)
            return feats, idx, torch.full((b,), n, dtype=torch.int64, device=feats.device)
        if prev_feats.shape != feats.shape:
            raise ScheduleError(
                f"frame batch changed shape from {list(prev_feats.shape)} to {list(feats.shape)}; call reset() first"
            )
        if self.mode == "feature":
            return torch.ops.edgetok.diff_drop(feats, prev_feats, self.threshold, self.num_prefix)
        keep = self._keep_mask(frames, feats, prev_frames, prev_feats)
        # Pixel decisions pass through the same op: unchanged tokens compare equal to themselves.
        return torch.ops.edgetok.diff_drop(feats, torch.where(keep[..., None], -feats, feats), 1.0, self.num_prefix)


@register_method("dtd", "TimeChat-Online differential token drop across video frames (clip and streaming)", kind="output")
def build_dtd(model, threshold: float = 0.1, mode: str = "feature", streaming: bool = False):
    """Returns DTDClip (frames -> packed kept tokens) or, with streaming=True, DTDStream."""
    return (DTDStream if streaming else DTDClip)(model, threshold, mode).train(model.training)
