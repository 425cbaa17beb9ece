"""Focus-DETR: foreground token scoring and top-k query selection in a DETR encoder.

Paper: Zheng, Dong, Hu, Chen, Wang, "Less is More: Focus Attention for
Efficient DETR", ICCV 2023 (arXiv:2307.12612); reference code
huawei-noah/noah-research/Focus-DETR.

Implemented: the foreground token selector's use at inference, on Hugging
Face DetrModel (single-scale) and DeformableDetrModel (multi-scale). A scoring
MLP (Linear-ReLU-Linear) gives every encoder input token a foreground score,
once; in encoder layer l only the top ``keep_l`` tokens by that score are
updated (they are the queries of the layer's attention and go through its
FFN), while *all* tokens serve as keys and values (for Deformable-DETR: the
value maps the sampling points read); the updated tokens are written back into
the full token map, so the encoder output keeps every token for the decoder.
On a multi-scale encoder the scores follow the paper's top-down modulation:
the coarsest level is scored first, and each finer level's features are
modulated by the bilinearly upsampled score of the level above,
``x_l + alpha_l * x_l * up(s_{l+1})``, before they are scored (one learnable
``alpha`` per finer level). ``keep_rate`` is one ratio or one per layer (the
paper's cascade of shrinking keep ratios); selection is the
``edgetok::token_drop`` op (top-k over all levels, stable ties, original
order) and the write-back a plain scatter. Scorer weights are random (seeded)
or loaded from a state_dict file.

Departures: the scorer reads the encoder input tokens directly (the paper
first passes them through the two-stage proposal projection); the paper's
second, fine-grained "object token" score and its dual attention
(self-attention among the top object tokens before the deformable attention)
are not implemented; no training (the scorer's foreground supervision from
boxes). Padding tokens (pixel mask 0) score -1 so they are picked only when
the budget exceeds the real tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ScheduleError, UnsupportedModelError
from .base import Reducer
from .registry import Plan
from .schedule import resolve


class ForegroundScorer(nn.Module):
    """Foreground probability per token [B,N] (-1 on padding). With ``levels`` > 1 the
    tokens are ``levels`` flattened feature maps (finest first, as Deformable-DETR
    concatenates them), scored coarse to fine with top-down modulation."""

    def __init__(self, dim: int, hidden: Optional[int] = None, seed: Optional[int] = 0, levels: int = 1):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden or dim), nn.ReLU(), nn.Linear(hidden or dim, 1))
        self.alpha = nn.Parameter(torch.zeros(levels - 1)) if levels > 1 else None
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.mlp.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
                if self.alpha is not None:  # the reference code's initial range
                    self.alpha.copy_(torch.rand(levels - 1, generator=g) * 0.6 - 0.3)

    @property
    def levels(self) -> int:
        return 1 if self.alpha is None else self.alpha.numel() + 1

    @classmethod
    def load(cls, path: str, dim: int, hidden: Optional[int] = None, levels: int = 1) -> "ForegroundScorer":
        scorer = cls(dim, hidden, seed=None, levels=levels)
        try:
            scorer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except RuntimeError as e:
            raise ScheduleError(f"Focus-DETR scorer file {path} does not fit a scorer of width {dim} and "
                                f"{levels} feature level(s): {e}") from None
        return scorer

    def logits(self, x: torch.Tensor, shapes: Optional[Sequence[tuple]] = None) -> torch.Tensor:
        if self.alpha is None:
            return self.mlp(x)[..., 0]
        if shapes is None or len(shapes) != self.levels:
            raise ScheduleError(f"this Focus-DETR scorer is for {self.levels} feature levels, the encoder "
                                f"has {0 if shapes is None else len(shapes)}")
        b, _, c = x.shape
        maps = x.split([h * w for h, w in shapes], dim=1)
        out, above = [None] * len(shapes), None
        for lvl in reversed(range(len(shapes))):
            h, w = shapes[lvl]
            x_l = maps[lvl]
            if above is not None:
                up = F.interpolate(above, size=(h, w), mode="bilinear", align_corners=True)
                x_l = x_l + self.alpha[lvl] * x_l * up.flatten(2).transpose(1, 2)
            out[lvl] = self.mlp(x_l)[..., 0]
            above = out[lvl].view(b, 1, h, w)
        return torch.cat(out, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                shapes: Optional[Sequence[tuple]] = None) -> torch.Tensor:
        score = torch.sigmoid(self.logits(x, shapes))
        return score if mask is None else score.masked_fill(mask == 0, -1.0)


def keep_count(n: int, rate: float) -> int:
    return max(1, math.ceil(rate * n))


def focus_select(x: torch.Tensor, score: torch.Tensor, keep: int):
    """Top-``keep`` tokens by foreground score, in original order: (tokens [B,K,C], idx [B,K])."""
    return torch.ops.edgetok.token_drop(x, score, int(keep), 0, 0)


def scatter_back(x: torch.Tensor, idx: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Write the updated tokens ``xq`` [B,K,C] back at ``idx`` [B,K] of ``x`` [B,N,C]."""
    return x.scatter(1, idx[..., None].expand(-1, -1, x.shape[-1]), xq)


class FocusStep(Reducer):
    """One encoder layer's budget: ``rate`` of the tokens are its queries; the token
    count after the layer is unchanged (the rest pass through)."""

    def __init__(self, rate: float):
        super().__init__()
        if not 0.0 < rate <= 1.0:
            raise ScheduleError(f"Focus-DETR keep_rate={rate} must be in (0, 1]")
        self.rate = float(rate)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"

    def queries(self, n: int) -> int:
        return keep_count(n, self.rate)

    def tokens_after(self, n: int, where: str = "") -> int:
        return n

    def forward(self, x, size, ctx):
        raise UnsupportedModelError("Focus-DETR runs inside a DETR encoder, not an image ViT block: "
                                    "use edgetok.reduce.focus_detr.apply(detr_model)")


def build_focus_detr(depth: int, tokens: int = 0, protect: int = 0,
                     keep_rate: Union[float, Sequence[float], str] = 0.3) -> Plan:
    """``keep_rate``: one ratio for every layer or one per layer (a cascade, e.g. "0.5,0.4,0.3")."""
    rates = resolve(keep_rate, depth, "keep_rate")
    return Plan("focus_detr", {"keep_rate": rates}, [FocusStep(r) for r in rates])
