"""The adapter interface and the one generic reduced forward every family shares.

An adapter says, for one model family, where the tokens are (embedding,
blocks, head) and how to get q/k/v and the two residual branches out of a
block. The reduced forward is written once, here: pre-norm attention through
scaled_dot_product_attention (with proportional attention or the padding mask
as an additive bias, so fused kernels stay in use), then the block's reducer,
then the MLP. Token sizes travel explicitly through the loop; nothing is
stored on the model during a forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputShapeError
from ..reduce.base import AttentionContext


@dataclass(frozen=True)
class ModelInfo:
    """What the schedule, the FLOPs count and the exporter need to know about a model."""

    family: str
    depth: int
    dim: int
    heads: int
    head_dim: int
    num_prefix: int  # class + distillation + register tokens, never reduced
    patch_size: int
    image_size: tuple[int, int]
    in_chans: int
    attn_weights: int  # weights of the q/k/v and output projections of one block
    mlp_weights: int  # weights of the MLP of one block

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def tokens(self) -> int:
        gh, gw = self.grid
        return self.num_prefix + gh * gw

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, *self.image_size)


class Adapter:
    """Where the reduction goes in one model family. Subclasses fill in the hooks."""

    family: str = ""
    examples: str = ""  # e.g. "timm vit_*/deit_*" for error messages

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError for variants of the family the adapter cannot reduce."""

    def info(self, model: nn.Module) -> ModelInfo:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def embed(self, model: nn.Module, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def qkv(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-norm and q, k, v projections: [B,H,N,D] each."""
        raise NotImplementedError

    def scale(self, block: nn.Module) -> float:
        raise NotImplementedError

    def attn_delta(self, block: nn.Module, o: torch.Tensor) -> torch.Tensor:
        """Attention output [B,N,H*D] to what is added to the residual stream."""
        raise NotImplementedError

    def mlp_delta(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, model: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor], *args, **kwargs):
        """Final norm, pooling and head; returns what the original forward returns."""
        raise NotImplementedError

    def forward(self, model: nn.Module, *args, **kwargs):
        """The reduced model's forward: embed, blocks with reducers, head."""
        tokens, size = run_blocks(self, model, self.embed(model, *args, **kwargs))
        return self.finish(model, tokens, size)

    def class_methods(self) -> dict:
        """Extra methods for the reduced model's class (e.g. timm's forward_features)."""
        return {}

    # -- shared helpers ---------------------------------------------------
    @staticmethod
    def check_image(x: torch.Tensor, info: ModelInfo, dynamic: bool = False) -> None:
        c, h, w = info.input_shape
        if x.dim() != 4 or x.shape[1] != c or (not dynamic and tuple(x.shape[2:]) != (h, w)):
            raise InputShapeError(
                f"expected images of shape [batch, {c}, {h}, {w}] for this {info.family} model, "
                f"got {list(x.shape)}; resize the images or build the model for that size"
            )
        if dynamic and (x.shape[2] % info.patch_size or x.shape[3] % info.patch_size):
            raise InputShapeError(
                f"image size {tuple(x.shape[2:])} is not a multiple of the patch size {info.patch_size}"
            )


def attention_bias(size: Optional[torch.Tensor], prop_attn: bool, adaptive: bool) -> Optional[torch.Tensor]:
    """Additive attention bias [B,1,1,N]: log(size) for proportional attention
    (size 0 on padding gives -inf), or a padding mask for adaptive methods."""
    if size is None:
        return None
    if prop_attn:
        bias = size[..., 0].log()
    elif adaptive:
        bias = torch.zeros_like(size[..., 0]).masked_fill(size[..., 0] <= 0, float("-inf"))
    else:
        return None
    return bias[:, None, None, :]


def block_forward(adapter: Adapter, block: nn.Module, x, size, prop_attn: bool, adaptive: bool):
    b, n, _ = x.shape
    q, k, v = adapter.qkv(block, x)
    bias = attention_bias(size, prop_attn, adaptive)
    scale = adapter.scale(block)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    x = x + adapter.attn_delta(block, o.transpose(1, 2).reshape(b, n, -1))
    reducer = getattr(block, "token_reducer", None)
    if reducer is not None:
        x, size = reducer(x, size, AttentionContext(q, k, bias, scale))
    return x + adapter.mlp_delta(block, x), size


def run_blocks(adapter: Adapter, model: nn.Module, x: torch.Tensor, record: Optional[list] = None):
    """All blocks with their reducers. Returns (tokens, sizes or None).
    ``record`` collects the token count entering each block (and the final count)."""
    plan = getattr(model, "edgetok_plan", None)
    prop_attn = bool(plan and plan.prop_attn)
    adaptive = bool(plan and plan.adaptive)
    size = None
    for block in adapter.blocks(model):
        if record is not None:
            record.append(x.shape[1])
        x, size = block_forward(adapter, block, x, size, prop_attn, adaptive)
    if record is not None:
        record.append(x.shape[1])
    return x, size


def weighted_mean(x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over tokens, each weighted by the patches it stands for (0 on padding)."""
    if size is None:
        return x.mean(dim=1)
    return (x * size).sum(1) / size.sum(1).clamp_min(1e-6)


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
