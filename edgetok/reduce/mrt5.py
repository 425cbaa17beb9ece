"""MrT5: a learned delete gate inside a byte-level T5 encoder.

Paper: Kallini, Murty, Manning, Potts, Csordás, "MrT5: Dynamic Token Merging
for Efficient Byte-level Language Models", ICLR 2025 (arXiv:2410.20771);
reference code jkallini/mrt5.

Implemented: the delete gate G = k * sigmoid(LayerNorm(H) w + b) (one scalar
per token, k < 0, the paper's k = -30) computed on the hidden states after a
fixed encoder layer, and the paper's inference-time *hard deletion*: tokens
with G < k/2 are removed before the next layer, together with their rows and
columns of T5's relative position bias (kept tokens keep their original
relative positions) and their attention-mask entries. The gate weights are
random (seeded) or loaded from a file (``DeleteGate.load``).

Static-shape form (the departure that makes it exportable): deletion is
data-dependent, so the step keeps a fixed budget of ``max_keep`` slots through
one ``edgetok::token_drop`` node whose score is (G - k) for surviving tokens
and 0 for deleted or padding ones; slots filled by deleted tokens are masked
out of every later attention. Whenever ``max_keep`` is at least the number of
surviving tokens (``max_keep=None`` uses the batch maximum, eager only), the
outputs of the kept tokens equal the paper's hard deletion exactly; with a
smaller budget the tokens with the highest gate value win. The soft-deletion
training path (G added to the attention logits) and the gate's training loss
are not implemented.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import ScheduleError
from .registry import Plan

GATE_SCALE = -30.0  # the paper's k


class DeleteGate(nn.Module):
    """G = k * sigmoid(LayerNorm(h) w + b) per token, in (k, 0)."""

    def __init__(self, dim: int, scale: float = GATE_SCALE, seed: Optional[int] = 0, eps: float = 1e-6):
        super().__init__()
        if scale >= 0:
            raise ScheduleError(f"MrT5 gate scale k={scale} must be negative (the paper uses -30)")
        self.scale = float(scale)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, 1)
        if seed is not None:  # random but reproducible gate weights when none are loaded
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                self.proj.weight.copy_(torch.randn(1, dim, generator=g) / math.sqrt(dim))
                self.proj.bias.zero_()

    @classmethod
    def load(cls, path: str, dim: int, scale: float = GATE_SCALE) -> "DeleteGate":
        """A gate with weights from a state_dict file (keys norm.*, proj.*)."""
        gate = cls(dim, scale, seed=None)
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = gate.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ScheduleError(
                f"MrT5 gate file {path} does not fit a gate of width {dim}: missing {missing}, "
                f"unexpected {unexpected}; save DeleteGate(dim).state_dict()"
            )
        return gate

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.proj(self.norm(h))[..., 0])


def survivors(gate: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Tokens hard deletion keeps [B,N] bool: G >= k/2 and not padding."""
    return (gate >= scale / 2) & mask.bool()


def delete_tokens(x, gate, mask, max_keep: int, scale: float = GATE_SCALE):
    """Hard deletion into ``max_keep`` slots: (x [B,M,C], kept indices [B,M], new mask [B,M])."""
    keep = survivors(gate, mask, scale)
    score = torch.where(keep, gate - scale, torch.zeros_like(gate))
    out, idx = torch.ops.edgetok.token_drop(x, score, int(max_keep), 0, 0)
    return out, idx, keep.gather(1, idx).to(mask.dtype)


class DeleteStep(nn.Module):
    """The MrT5 step after encoder layer ``layer``: gate, then hard deletion."""

    def __init__(self, gate: DeleteGate, layer: int, max_keep: Optional[int]):
        super().__init__()
        self.gate, self.layer = gate, int(layer)
        self.max_keep = None if max_keep is None else int(max_keep)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, max_keep={self.max_keep}, k={self.gate.scale}"

    def slots(self, gate: torch.Tensor, mask: torch.Tensor) -> int:
        n = gate.shape[1]
        if self.max_keep is not None:
            if not 1 <= self.max_keep <= n:
                raise ScheduleError(f"MrT5 max_keep={self.max_keep} must be between 1 and the {n} input tokens")
            return self.max_keep
        # eager only: the batch maximum of surviving tokens (data-dependent shape)
        return max(1, int(survivors(gate, mask, self.gate.scale).sum(1).max()))

    def forward(self, x, mask):
        g = self.gate(x)
        return delete_tokens(x, g, mask, self.slots(g, mask), self.gate.scale)


def build_mrt5(depth: int, tokens: int, protect: int, dim: int = 0, layer: int = 2, max_keep=None,
               gate_path: Optional[str] = None, scale: float = GATE_SCALE, seed: int = 0) -> Plan:
    """One DeleteStep after block ``layer`` (0-based: the default 2 is the paper's
    "after the third encoder layer"); ``max_keep`` slots (None: batch maximum, eager only)."""
    if not 0 <= layer < depth - 1:
        raise ScheduleError(f"MrT5 layer={layer} must be a block index below the last ({depth - 1}) "
                            "so at least one block runs on the shortened sequence")
    if dim <= 0:
        raise ScheduleError("MrT5 needs the encoder width dim= to build its gate")
    gate = DeleteGate.load(gate_path, dim, scale) if gate_path else DeleteGate(dim, scale, seed)
    step = DeleteStep(gate, layer, max_keep)
    reducers = [step if i == layer else None for i in range(depth)]
    params = {"layer": layer, "max_keep": max_keep, "gate_path": gate_path, "scale": scale, "seed": seed}
    return Plan("mrt5", params, reducers, adaptive=max_keep is None)
