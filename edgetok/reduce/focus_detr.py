"""Focus-DETR: foreground token scoring and top-k query selection in a DETR encoder.

Paper: Zheng, Dong, Hu, Chen, Wang, "Less is More: Focus Attention for
Efficient DETR", ICCV 2023 (arXiv:2307.12612); reference code
huawei-noah/noah-research/Focus-DETR.

Implemented: the foreground token selector's use at inference. A scoring MLP
(Linear-ReLU-Linear-sigmoid) gives every encoder input token a foreground
score, once; in encoder layer l only the top ``keep_l`` tokens by that score
are updated (they are the queries of the layer's attention and go through its
FFN), while *all* tokens serve as keys and values; the updated tokens are
written back into the full token map, so the encoder output keeps every
token for the decoder. ``keep_rate`` is one ratio or one per layer (the
paper's cascade of shrinking keep ratios); selection is the
``edgetok::token_drop`` op (top-k, stable ties, original order) and the
write-back a plain scatter. Scorer weights are random (seeded) or loaded from
a state_dict file.

Departures: Hugging Face DetrModel is single-scale, so the multi-scale
top-down score modulation does not apply; the paper's second, fine-grained
"object token" score and its dual attention (self-attention among the top
object tokens before the deformable attention) are not implemented; no
training (the scorer's foreground supervision from boxes). Deformable-DETR is
not adapted: its encoder's sampling offsets and reference points would need a
second adapter (not done in this session). Padding tokens (pixel mask 0)
score -1 so they are picked only when the budget exceeds the real tokens.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ScheduleError, UnsupportedModelError
from .base import Reducer
from .registry import Plan, register_method
from .schedule import resolve


class ForegroundScorer(nn.Module):
    """Foreground probability per token: sigmoid(MLP(x)) [B,N]; -1 on padding."""

    def __init__(self, dim: int, hidden: Optional[int] = None, seed: Optional[int] = 0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden or dim), nn.ReLU(), nn.Linear(hidden or dim, 1))
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.mlp.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))

    @classmethod
    def load(cls, path: str, dim: int, hidden: Optional[int] = None) -> "ForegroundScorer":
        scorer = cls(dim, hidden, seed=None)
        try:
            scorer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except RuntimeError as e:
            raise ScheduleError(f"Focus-DETR scorer file {path} does not fit a scorer of width {dim}: {e}") from None
        return scorer

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        score = torch.sigmoid(self.mlp(x)[..., 0])
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


@register_method("focus_detr", "Focus-DETR: foreground-scored top-k queries per DETR encoder layer (HF DetrModel)", kind="model")
def apply(model: nn.Module, keep_rate=0.3, scorer: Optional[nn.Module] = None, scorer_path: Optional[str] = None,
          seed: int = 0) -> nn.Module:
    """A Focus-DETR copy of a Hugging Face DETR model. ``scorer``/``scorer_path``: foreground
    scorer to use (default: a random ForegroundScorer seeded with ``seed``)."""
    from ..patch.hf_detr import detr_encoder, reduce_detr

    enc = detr_encoder(model)
    dim = enc.config.d_model
    if scorer is None:
        scorer = ForegroundScorer.load(scorer_path, dim) if scorer_path else ForegroundScorer(dim, seed=seed)
    plan = build_focus_detr(len(enc.layers), keep_rate=keep_rate)
    return reduce_detr(model, plan, scorer)
