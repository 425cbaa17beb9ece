"""What a reduction step sees and returns, shared by every method."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class AttentionContext:
    """The attention of the block a reducer sits in: q, k [B,H,N,D], the additive
    bias the attention used ([B,1,1,N] or None) and its scale. Scores that need
    more than q and k are computed here, once, only when a reducer asks."""

    q: torch.Tensor
    k: torch.Tensor
    bias: Optional[torch.Tensor]
    scale: float
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def metric(self) -> torch.Tensor:
        """ToMe's matching metric: the keys averaged over heads [B,N,D]."""
        if "metric" not in self._cache:
            self._cache["metric"] = self.k.mean(1)
        return self._cache["metric"]

    def _probs(self, q: torch.Tensor) -> torch.Tensor:
        logits = (q @ self.k.transpose(-1, -2)) * self.scale
        if self.bias is not None:
            logits = logits + self.bias
        return logits.softmax(-1)

    @property
    def cls_attn(self) -> torch.Tensor:
        """Class token's attention to every token, averaged over heads [B,N]. One
        query row only: the full attention matrix is never materialised."""
        if "cls_attn" not in self._cache:
            self._cache["cls_attn"] = self._probs(self.q[:, :, :1]).mean(1)[:, 0]
        return self._cache["cls_attn"]

    @property
    def mean_attn(self) -> torch.Tensor:
        """Attention each token receives, averaged over queries and heads [B,N]
        (the score for models without a class token)."""
        if "mean_attn" not in self._cache:
            self._cache["mean_attn"] = self._probs(self.q).mean(dim=(1, 2))
        return self._cache["mean_attn"]


class Reducer(nn.Module):
    """One reduction step, placed between a block's attention and its MLP.

    ``forward(x, size, ctx)`` takes tokens [B,N,C], sizes [B,N,1] (patches per
    token; 0 marks padding) and the block's AttentionContext, and returns the
    reduced tokens and sizes. ``tokens_after(n)`` is the static token count
    after the step (an upper bound for adaptive methods); it raises
    ScheduleError when ``n`` tokens cannot give what the step asks.
    """

    adaptive = False  # True when the output count depends on the data

    def tokens_after(self, n: int, where: str = "") -> int:
        raise NotImplementedError

    def reduction_flops(self, n: int, dim: int) -> int:
        """FLOPs of the reduction step itself (similarity, selection, merge)."""
        return 0


ScoreFn = Callable[[torch.Tensor, AttentionContext], torch.Tensor]
