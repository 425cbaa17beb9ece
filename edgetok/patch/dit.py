"""A small diffusion transformer (DiT) block stack and its FlexDiT forward.

Model: Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023
(arXiv:2212.09748): patchify, adaLN-Zero blocks conditioned on timestep +
class embeddings, adaLN final layer, unpatchify. Defined here because
diffusers is not a dependency of edgetok; sizes are free (tests use tiny
ones). Departures from the reference DiT: the position embedding is a
learned parameter (random, not fixed sin-cos) and all weights keep PyTorch's
default random init — adaLN-Zero's zero init is a training choice that would
make every block an identity with random weights.

The FlexDiT copy of a DiT gets a subclass whose forward runs a span of middle
blocks on pooled (sparse) tokens (see edgetok.reduce.flexdit); weights and
state_dict keys are unchanged.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdgetokError, InputShapeError, ScheduleError, UnsupportedModelError
from ..reduce.flexdit import build_flexdit, check_stages, pool_tokens, unpool_tokens
from ..reduce.registry import register_method
from .hf_detr import swap_forward


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 64):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + gate * Attn(modulate(LN(x))), x + gate * MLP(modulate(LN(x)))."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT on latents [B, in_channels, input_size, input_size]."""

    def __init__(self, input_size: int = 8, patch_size: int = 2, in_channels: int = 4, hidden: int = 64,
                 depth: int = 4, heads: int = 4, num_classes: int = 10, mlp_ratio: float = 4.0):
        super().__init__()
        if input_size % patch_size:
            raise InputShapeError(f"DiT input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid, hidden) * 0.02)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)  # last row: the null class (guidance)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch_size, in_channels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (s, s):
            raise InputShapeError(f"expected latents [batch, {self.in_channels}, {s}, {s}], got {list(x.shape)}")
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t) + self.y_embedder(y)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, c = x.shape[0], self.grid, self.patch_size, self.out_channels
        x = x.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, c = self.embed(x), self.condition(t, y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def _flexdit_forward(self, x, t, y):

    plan = self.edgetok_plan
    factor = plan.summary["factor_for"](t)
    start, end = plan.params["sparse_layers"]
    h, c = self.embed(x), self.condition(t, y)
    for i, block in enumerate(self.blocks):
        if factor > 1 and i == start:
            sparse_in = pool_tokens(h, self.grid, factor)
            hs = sparse_in
        if factor > 1 and start <= i < end:
            hs = block(hs, c)
            if i == end - 1:  # dense recovery: every dense token gets its cell's sparse update
                h = h + unpool_tokens(hs - sparse_in, self.grid, factor)
        else:
            h = block(h, c)
    return self.unpatchify(self.final_layer(h, c))


def reduce_dit(model: nn.Module, plan) -> nn.Module:
    """A copy of a DiT whose forward runs ``plan`` (see edgetok.reduce.flexdit)."""
    if not isinstance(model, DiT):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not an edgetok.patch.dit.DiT; FlexDiT here patches that block stack"
        )
    if hasattr(model, "edgetok_plan"):
        raise EdgetokError("this DiT is already reduced; apply FlexDiT to the original model")
    reduced = copy.deepcopy(model)
    swap_forward(reduced, _flexdit_forward, "FlexDiT")
    reduced.edgetok_plan = plan
    return reduced.train(model.training)


@register_method("flexdit", "FlexDiT token density across DiT layers and timesteps (pooled sparse span)", kind="model")
def flexdit(model: nn.Module, sparse_layers=None, stages=((500, 2), (0, 1))) -> nn.Module:
    """A FlexDiT copy of a DiT (edgetok/reduce/flexdit.py: the method)."""
    if not isinstance(model, DiT):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not an edgetok.patch.dit.DiT; FlexDiT reduces a DiT block stack"
        )
    plan = build_flexdit(len(model.blocks), model.grid * model.grid, 0, grid=model.grid,
                         sparse_layers=sparse_layers, stages=stages)
    return reduce_dit(model, plan)


def at_factor(model: nn.Module, factor: int) -> nn.Module:
    """A copy of a FlexDiT model fixed at one pooling factor whatever ``t`` is (static
    shapes: export and build one model per density stage)."""
    plan = getattr(model, "edgetok_plan", None)
    if plan is None or plan.method != "flexdit":
        raise ScheduleError("at_factor takes a FlexDiT model (edgetok.apply(dit, \"flexdit\", ...))")
    check_stages([(0, factor)], plan.params["grid"])
    fixed = copy.deepcopy(model)
    fixed.edgetok_plan = copy.copy(plan)
    fixed.edgetok_plan.params = {**plan.params, "fixed_factor": int(factor)}
    fixed.edgetok_plan.summary = {**plan.summary, "factor_for": lambda t: int(factor)}
    return fixed
