"""Tail drop of ordered 1-D token sequences (One-D-Piece / TiTok): keep the first k.

Papers: Miwa et al., "One-D-Piece: Image Tokenizer Meets Quality-Controllable
Compression", arXiv:2501.10064 (2025), which trains a TiTok-style tokenizer with
"Tail Token Drop" so that the head of the 1-D token sequence carries most of the
content; Yu et al., "An Image is Worth 32 Tokens for Reconstruction and
Generation" (TiTok), NeurIPS 2024 (arXiv:2406.07550), the 1-D tokenizer it builds on.

Implemented: the inference-time step those models are built for. Between a
block's attention and its MLP, only the first ``keep`` tokens of the ordered
sequence (after ``protect_first`` leading class/register tokens, which are
always kept) go on; the rest are removed. ``keep`` is the quality knob: any k
at inference, the same weights. The step is one ``edgetok::token_drop`` node
whose score is a strictly decreasing ramp over positions, so top-k is the
prefix and the export and the TensorRT plugin are the existing TokenDrop.

Departures: the training side (random tail drop during tokenizer training,
the quantizer and the decoder that rebuilds an image from k tokens) is not
here; edgetok applies the drop to a token stack it is given. Applied to an
image ViT (raster-ordered patches) the mechanism runs but the prefix has no
"coarse-to-fine" meaning: that needs a model trained with tail drop.
"""
from __future__ import annotations

import torch

from ..errors import ScheduleError
from .base import Reducer
from .drop import check_keep
from .registry import Plan, register_method
from .schedule import keep_from_rate


def prefix_scores(x: torch.Tensor) -> torch.Tensor:
    """Strictly decreasing score over positions [B,N]: top-k by it is the first k."""
    b, n = x.shape[:2]
    return torch.arange(n, 0, -1, dtype=x.dtype, device=x.device).expand(b, n)


def tail_drop(x: torch.Tensor, keep: int, protect_first: int = 0) -> torch.Tensor:
    """Reference: the first ``keep`` tokens of ``x`` [B,N,C] (protected ones count in ``keep``)."""
    check_keep(x.shape[1], keep, protect_first)
    return x[:, :keep]


class TailDrop(Reducer):
    """Keep the first ``keep`` tokens (edgetok::token_drop with a position ramp)."""

    def __init__(self, keep: int, protect_first: int):
        super().__init__()
        self.keep, self.protect_first = int(keep), int(protect_first)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, protect_first={self.protect_first}"

    def tokens_after(self, n: int, where: str = "") -> int:
        check_keep(n, self.keep, self.protect_first, where)
        return self.keep

    def forward(self, x, size, ctx):
        out, idx = torch.ops.edgetok.token_drop(x, prefix_scores(x), self.keep, self.protect_first, 0)
        if size is None:
            return out, None
        return out, size.gather(1, idx[..., None])


@register_method("tail_drop", "One-D-Piece/TiTok tail drop: keep the first k tokens of an ordered sequence")
def build_tail_drop(depth: int, tokens: int, protect: int, keep=None, keep_rate=None, layer=None) -> Plan:
    """``keep``: tokens kept (protected ones included), or ``keep_rate`` of the
    unprotected ones; ``layer``: the block whose attention output is cut (default
    the last, i.e. the encoder output is truncated and its last MLP runs on k tokens)."""
    if (keep is None) == (keep_rate is None):
        raise ScheduleError("tail_drop needs exactly one of keep= (a token count) or keep_rate=")
    layer = depth - 1 if layer is None else int(layer)
    if not 0 <= layer < depth:
        raise ScheduleError(f"tail_drop layer={layer} is outside the model's {depth} layers")
    k = int(keep) if keep is not None else keep_from_rate(tokens, keep_rate, protect)
    step = TailDrop(k, protect)
    step.tokens_after(tokens, f"layer {layer}: ")
    reducers = [step if i == layer else None for i in range(depth)]
    return Plan("tail_drop", {"keep": k, "layer": layer, "protect_first": protect}, reducers)
