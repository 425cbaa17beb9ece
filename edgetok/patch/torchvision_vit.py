"""torchvision VisionTransformer: vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14
(EncoderBlock with nn.MultiheadAttention), class-token pooled.

q, k and v come from the attention's packed in_proj_weight / in_proj_bias and
the output from its out_proj, so the weights are used as they are; the
attention runs through scaled_dot_product_attention like every other family.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, ModelInfo, linear_weights
from .hf_common import loaded_classes

_MODULE = "torchvision.models.vision_transformer"


class TorchvisionViTAdapter(Adapter):
    family = "torchvision-vit"
    examples = "torchvision VisionTransformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14)"

    def matches(self, model) -> bool:
        return isinstance(model, loaded_classes(_MODULE, "VisionTransformer"))

    def check(self, model) -> None:
        (block_cls,) = loaded_classes(_MODULE, "EncoderBlock")
        for i, blk in enumerate(self.blocks(model)):
            a = getattr(blk, "self_attention", None)
            if type(blk) is not block_cls or type(a) is not nn.MultiheadAttention:
                raise UnsupportedModelError(
                    f"block {i} of this torchvision ViT is {type(blk).__name__}; edgetok reduces torchvision's "
                    "EncoderBlock with nn.MultiheadAttention"
                )
            if not a._qkv_same_embed_dim or a.bias_k is not None or a.add_zero_attn or not a.batch_first:
                raise UnsupportedModelError(
                    f"block {i}'s nn.MultiheadAttention uses separate q/k/v dims, bias_k/bias_v, add_zero_attn or "
                    "sequence-first layout; edgetok reduces the packed, batch-first attention torchvision builds"
                )

    def info(self, model) -> ModelInfo:
        blk = self.blocks(model)[0]
        a = blk.self_attention
        return ModelInfo(
            family=self.family,
            depth=len(self.blocks(model)),
            dim=model.hidden_dim,
            heads=a.num_heads,
            head_dim=a.head_dim,
            num_prefix=1,
            patch_size=model.patch_size,
            image_size=(model.image_size, model.image_size),
            in_chans=3,  # torchvision builds the stem for RGB only
            attn_weights=a.in_proj_weight.numel() + a.out_proj.weight.numel(),
            mlp_weights=linear_weights(blk.mlp),
        )

    def blocks(self, model):
        return model.encoder.layers

    def embed(self, model, x: torch.Tensor) -> torch.Tensor:
        self.check_image(x, self.info(model))
        x = model._process_input(x)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return model.encoder.dropout(x + model.encoder.pos_embedding)

    def qkv(self, block, x):
        a = block.self_attention
        b, n, _ = x.shape
        qkv = F.linear(block.ln_1(x), a.in_proj_weight, a.in_proj_bias)
        return qkv.reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def scale(self, block) -> float:
        return block.self_attention.head_dim**-0.5

    def attn_delta(self, block, o):
        return block.dropout(block.self_attention.out_proj(o))

    def mlp_delta(self, block, x):
        return block.mlp(block.ln_2(x))

    def finish(self, model, x, size: Optional[torch.Tensor]):
        return model.heads(model.encoder.ln(x)[:, 0])
