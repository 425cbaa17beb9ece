"""Token and FLOPs accounting per layer, from a model's shape and a reduction plan.

FLOPs count multiply-adds as 2 operations, over the transformer blocks (q/k/v
and output projections, attention scores and weighted sum, MLP) plus the
reduction steps themselves; the patch embedding is counted once, the head is
left out (it does not change with reduction). For adaptive methods the counts
are those measured on the given input, or the upper bound without one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence


@dataclass
class LayerFlops:
    layer: int
    tokens_in: int
    tokens_out: int
    attn: int
    reduction: int
    mlp: int

    @property
    def total(self) -> int:
        return self.attn + self.reduction + self.mlp


@dataclass
class FlopsReport:
    """Per-layer token counts and FLOPs of one model at one input shape (batch 1)."""

    layers: list[LayerFlops]
    embed: int
    measured: bool = False  # True when adaptive counts come from a real input
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.embed + sum(l.total for l in self.layers)

    @property
    def tokens(self) -> list[int]:
        """Tokens entering each block, then the count after the last one."""
        return [l.tokens_in for l in self.layers] + [self.layers[-1].tokens_out]

    def ratio_to(self, baseline: "FlopsReport") -> float:
        """Ideal speed-up: baseline FLOPs / these FLOPs."""
        return baseline.total / self.total

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "embed": self.embed,
            "tokens": self.tokens,
            "measured": self.measured,
            "layers": [asdict(l) | {"total": l.total} for l in self.layers],
            "notes": self.notes,
        }


def block_flops(info, n_in: int, n_out: int, reducer) -> LayerFlops:
    attn_dim = info.heads * info.head_dim
    attn = 2 * n_in * info.attn_weights + 2 * 2 * n_in * n_in * attn_dim
    red = reducer.reduction_flops(n_in, info.head_dim) if reducer is not None else 0
    return LayerFlops(0, n_in, n_out, attn, red, 2 * n_out * info.mlp_weights)


def count(info, reducers: Sequence, measured: Optional[Sequence[int]] = None) -> FlopsReport:
    """FLOPs report for a model with ``info`` and one reducer (or None) per block.
    ``measured``: token counts entering each block and after the last, if run."""
    layers, n = [], info.tokens
    for i, red in enumerate(reducers):
        if measured is not None:
            n, n_out = measured[i], measured[i + 1]
        else:
            n_out = red.tokens_after(n, f"layer {i}: ") if red is not None else n
        lf = block_flops(info, n, n_out, red)
        lf.layer = i
        layers.append(lf)
        n = n_out
    gh, gw = info.grid
    embed = 2 * gh * gw * info.in_chans * info.patch_size**2 * info.dim
    return FlopsReport(layers, embed, measured is not None)
