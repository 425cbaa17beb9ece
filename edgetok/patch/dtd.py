"""TimeChat-Online's differential token drop around an encoder: the whole-clip and the
streaming wrappers registered as method ``dtd`` (the rule, ``diff_drop``, is
edgetok/reduce/dtd.py, which cites the paper)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ScheduleError
from ..reduce.dtd import pixel_change, token_change
from ..reduce.registry import register_method
from . import adapter_for
from .base import run_blocks


@dataclass
class DTDOutput:
    """Kept visual tokens of a clip, packed: what a language model receives."""

    tokens: torch.Tensor  # [K, C]
    frame_index: torch.Tensor  # [K] frame of each kept token
    token_index: torch.Tensor  # [K] position of each kept token in its frame's token sequence
    kept_per_frame: torch.Tensor  # [T]


def _encode(model, frames: torch.Tensor) -> torch.Tensor:
    adapter = adapter_for(model)
    return run_blocks(adapter, model, adapter.embed(model, frames))[0]


class _DTDBase(nn.Module):
    def __init__(self, model: nn.Module, threshold: float, mode: str):
        super().__init__()
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
