"""Self-slimmed ViT's Token Slimming Module: soft aggregation of N tokens into M.

Paper: Zong, Li, Song, Wang, Liu, Li, Zhang, Liu, "Self-slimmed Vision
Transformer", ECCV 2022 (arXiv:2111.12624); reference code Sense-X/SiT.

Implemented: the Token Slimming Module (TSM). A slimming layer maps each token
to M logits (LayerNorm -> Linear(C, C*hidden_ratio) -> GELU -> Linear(., M),
times a learned scale); a softmax over the N input tokens gives an M x N
aggregation matrix A whose rows are convex weights, and the M output tokens
are A @ X. The class (and register) tokens pass through unchanged, as in SiT.
Token sizes (patches per token) are split over the outputs in proportion to
each input's aggregation weights (columns of A normalised), so the slimmed
tokens still stand for all the patches (used by size-weighted pooling). The slimming layers are given
(nn.Modules, state dicts in SiT's TokenSlimmingModule layout — keys
``weight.*`` and ``scale`` — or a torch file holding a list of them) or
initialised randomly from ``seed`` the way SiT initialises them
(truncated normal, std 0.02); random layers need the model width ``dim``.

Departures: SiT slims after a stage's last block; edgetok's reduction point is
between a block's attention and its MLP, so the TSM of ``layers=[i]`` runs
before block i's MLP. Not implemented: SiT's training parts (the reverse TSM and
feature-recalibration distillation) — slimming layers must come trained from
elsewhere to keep accuracy.

Export: standard ops only (LayerNormalization, MatMul, Gelu, Softmax,
MatMul); a soft aggregation is neither a merge nor a drop, so no custom op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ScheduleError
from .base import Reducer
from .registry import Plan, register_method
from .scored import keep_counts


class SlimmingLayer(nn.Module):
    """SiT's TokenSlimmingModule weights: tokens [B,N,C] -> aggregation logits [B,N,M]."""

    def __init__(self, dim: int, out_tokens: int, hidden_ratio: float = 0.5):
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.weight = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out_tokens))
        self.scale = nn.Parameter(torch.ones(1, 1, 1))

    def reset(self, generator: torch.Generator) -> "SlimmingLayer":
        for m in self.weight:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, generator=generator)
                nn.init.zeros_(m.bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight(x) * self.scale


def slim_tokens(x: torch.Tensor, size: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregate ``x`` [B,N,C] into M tokens with ``logits`` [B,N,M] (softmax over N)."""
    a = logits.softmax(dim=1).transpose(1, 2)  # [B,M,N], rows sum to 1
    share = a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)  # each input's patches split over the outputs
    return a @ x, share @ size


class TokenSlimming(Reducer):
    """One TSM step: unprotected tokens -> ``keep - protect_first`` slimmed tokens."""

    def __init__(self, keep: int, protect_first: int, layer: nn.Module):
        super().__init__()
        self.keep, self.protect_first, self.layer = int(keep), int(protect_first), layer

    def extra_repr(self) -> str:
        return f"keep={self.keep}, protect_first={self.protect_first}"

    def tokens_after(self, n: int, where: str = "") -> int:
        if not self.protect_first < self.keep <= n:
            raise ScheduleError(f"{where}slim cannot slim {n} tokens into {self.keep} ({self.protect_first} protected)")
        return self.keep

    def reduction_flops(self, n: int, dim: int) -> int:
        m = self.keep - self.protect_first
        lin = [mod for mod in self.layer.modules() if isinstance(mod, nn.Linear)]
        width = lin[0].in_features if lin else dim
        return sum(2 * n * mod.in_features * mod.out_features for mod in lin) + 2 * m * n * (width + 1)

    def forward(self, x, size, ctx):
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        p = self.protect_first
        body, body_size = slim_tokens(x[:, p:], size[:, p:], self.layer(x[:, p:]))
        return torch.cat([x[:, :p], body], dim=1), torch.cat([size[:, :p], body_size], dim=1)


def _layers(weights, count: int, outs: list[int], dim: Optional[int], hidden_ratio: float, seed: int):
    if weights is None:
        if dim is None:
            raise ScheduleError("slim with random slimming layers needs the model width: "
                                "pass dim= (e.g. 192 for ViT-Ti) or weights=")
        g = torch.Generator().manual_seed(int(seed))
        return [SlimmingLayer(int(dim), m, hidden_ratio).reset(g) for m in outs]
    if isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__"):
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(weights, (nn.Module, dict)):
        weights = [weights]
    weights = list(weights)
    if len(weights) != count:
        raise ScheduleError(f"slim got {len(weights)} slimming layers but the schedule slims at {count} layers")
    layers = []
    for w, m in zip(weights, outs):
        if isinstance(w, nn.Module):
            layers.append(w)
            continue
        ln = w.get("weight.0.weight")
        if ln is None:
            raise ScheduleError("slim weights must be nn.Modules or state dicts of SiT's TokenSlimmingModule "
                                f"(keys weight.0.weight, ..., scale); got keys {sorted(w)[:6]}")
        hidden = w["weight.1.weight"].shape[0]
        layer = SlimmingLayer(ln.shape[0], m, hidden / ln.shape[0])
        try:
            layer.load_state_dict(w)
        except RuntimeError as e:
            raise ScheduleError(f"slim weights do not fit a slimming layer to {m} tokens: {e}") from None
        layers.append(layer)
    return layers


@register_method("slim", "Self-slimmed ViT token slimming: soft aggregation of N tokens into M (given or random layer)")
def build_slim(depth: int, tokens: int, protect: int, keep_rate=None, r=None, layers=None, dim: Optional[int] = None,
               weights=None, seed: int = 0, hidden_ratio: float = 0.5, protect_first=None) -> Plan:
    """``keep_rate`` at ``layers`` (SiT: 0.5 per stage) or ``r`` per layer; the slimming
    layers are ``weights`` (one per slimming layer) or random from ``seed`` (needs ``dim``)."""
    p = protect if protect_first is None else int(protect_first)
    keeps = keep_counts(depth, tokens, p, keep_rate, r, layers, "slim")
    where = [i for i, k in enumerate(keeps) if k is not None]
    for i in where:
        if keeps[i] <= p:
            raise ScheduleError(f"slim layer {i}: must keep at least one token besides the {p} protected ones")
    mods = _layers(weights, len(where), [keeps[i] - p for i in where], dim, hidden_ratio, seed)
    reducers = [None] * depth
    for i, mod in zip(where, mods):
        reducers[i] = TokenSlimming(keeps[i], p, mod)
    params = {"keeps": keeps, "seed": seed if weights is None else None, "protect_first": p}
    return Plan("slim", params, reducers)
