"""timm VisionTransformer family: ViT, DeiT (incl. distilled), DINOv2-style
(layer scale, register tokens), class-token-free (average-pooled) variants."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import UnsupportedModelError
from .base import Adapter, ModelInfo, linear_weights, run_blocks, weighted_mean


class TimmViTAdapter(Adapter):
    family = "timm-vit"
    examples = "timm VisionTransformer models (vit_*, deit_*, *_dinov2, *_reg*)"

    def matches(self, model) -> bool:
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:
            return False
        return isinstance(model, VisionTransformer)

    def check(self, model) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        for i, blk in enumerate(model.blocks):
            if not isinstance(blk, Block) or type(blk.attn) is not Attention or blk.attn.gate is not None:
                raise UnsupportedModelError(
                    f"block {i} of this timm model is {type(blk).__name__} with {type(blk.attn).__name__}; "
                    "edgetok reduces timm's pre-norm Block with the standard (ungated) Attention"
                )
        if model.attn_pool is not None:
            raise UnsupportedModelError(
                "timm models with an attention-pooling head (attn_pool) are not supported yet: "
                "the pooling head would ignore token sizes; use a token- or average-pooled model"
            )

    def info(self, model) -> ModelInfo:
        blk = model.blocks[0]
        pe = model.patch_embed
        return ModelInfo(
            family=self.family,
            depth=len(model.blocks),
            dim=model.embed_dim,
            heads=blk.attn.num_heads,
            head_dim=blk.attn.head_dim,
            num_prefix=model.num_prefix_tokens,
            patch_size=pe.patch_size[0],
            image_size=tuple(pe.img_size),
            in_chans=pe.proj.in_channels,
            attn_weights=linear_weights(blk.attn),
            mlp_weights=linear_weights(blk.mlp),
        )

    def blocks(self, model):
        return model.blocks

    def embed(self, model, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("reduced models do not take an attention mask: token reduction changes the token count")
        self.check_image(x, self.info(model), dynamic=model.dynamic_img_size)
        x = model._pos_embed(model.patch_embed(x))
        return model.norm_pre(model.patch_drop(x))

    def qkv(self, block, x):
        a = block.attn
        b, n, _ = x.shape
        qkv = a.qkv(block.norm1(x)).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return a.q_norm(q), a.k_norm(k), v

    def scale(self, block) -> float:
        return block.attn.scale

    def attn_delta(self, block, o):
        a = block.attn
        return block.drop_path1(block.ls1(a.proj_drop(a.proj(a.norm(o)))))

    def mlp_delta(self, block, x):
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def class_methods(self) -> dict:
        adapter = self

        def forward_features(model, x, attn_mask=None, is_causal=False):
            """Reduced tokens after the final norm (sizes: use forward_tokens)."""
            return model.norm(run_blocks(adapter, model, adapter.embed(model, x, attn_mask, is_causal))[0])

        return {"forward_features": forward_features}

    def finish(self, model, x, size: Optional[torch.Tensor], pre_logits: bool = False):
        x = model.norm(x)
        if model.global_pool in ("", "token") or not hasattr(model, "pool"):
            return model.forward_head(x, pre_logits=pre_logits)
        body = x if model.pool_include_prefix else x[:, model.num_prefix_tokens :]
        s = None
        if size is not None:
            s = size if model.pool_include_prefix else size[:, model.num_prefix_tokens :]
        if model.global_pool == "avg":
            pooled = weighted_mean(body, s)
        elif model.global_pool in ("max", "avgmax"):
            masked = body if s is None else body.masked_fill(s <= 0, float("-inf"))
            pooled = masked.amax(dim=1)
            if model.global_pool == "avgmax":
                pooled = 0.5 * (pooled + weighted_mean(body, s))
        else:
            raise UnsupportedModelError(f"unknown timm global_pool {model.global_pool!r}")
        pooled = model.head_drop(model.fc_norm(pooled))
        return pooled if pre_logits else model.head(pooled)
