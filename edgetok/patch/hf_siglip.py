"""Hugging Face transformers SigLIP vision tower: SiglipVisionModel and
SiglipForImageClassification (SiglipEncoderLayer).

SigLIP has no class token, so nothing is protected (num_prefix 0) and the drop
method scores tokens by mean attention. Its pooling head is one
multihead-attention query (the probe) over all tokens; the reduced model
passes the blocks' additive bias to that attention as well: log(size) for
proportional attention (ToMe, Bolya et al., ICLR 2023), -inf on the padding
of adaptive methods. Merged tokens then weigh as many patches as they stand
for, and padding is never attended.
SiglipForImageClassification's token mean is size-weighted.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import attention_bias, weighted_mean
from .hf_common import HFAdapter, LayerSpec, loaded_classes


class HFSiglipAdapter(HFAdapter):
    family = "hf-siglip"
    examples = "Hugging Face transformers SiglipVisionModel, SiglipForImageClassification"
    module = "transformers.models.siglip.modeling_siglip"
    class_names = ("SiglipVisionModel", "SiglipForImageClassification")
    layer_names = ("SiglipEncoderLayer",)
    spec = LayerSpec(
        norm1="layer_norm1",
        attn="self_attn",
        out_proj="out_proj",
        norm2="layer_norm2",
        mlp="mlp",
        heads="num_heads",
        scale="scale",
    )

    def core(self, model):
        return model if isinstance(model, loaded_classes(self.module, "SiglipVisionModel")) else model.vision_model

    def num_prefix(self, model) -> int:
        return 0

    def blocks(self, model):
        return self.core(model).encoder.layers

    def embed(self, model, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        self.check_image(pixel_values, self.info(model), dynamic=bool(interpolate_pos_encoding))
        return self.core(model).embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))

    @staticmethod
    def pool(model, head, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
        """SiglipMultiheadAttentionPoolingHead.forward with the token bias as attn_mask."""
        plan = getattr(model, "edgetok_plan", None)
        bias = attention_bias(size, bool(plan and plan.prop_attn), bool(plan and plan.adaptive))
        mask = None
        if bias is not None:  # [B,1,1,N] -> nn.MultiheadAttention's per-head float mask [B*H,1,N]
            b, n = x.shape[0], x.shape[1]
            mask = bias.to(x.dtype).expand(b, head.attention.num_heads, 1, n).reshape(-1, 1, n)
        probe = head.probe.repeat(x.shape[0], 1, 1)
        y = head.attention(probe, x, x, attn_mask=mask, need_weights=False)[0]
        y = y + head.mlp(head.layernorm(y))
        return y[:, 0]

    def finish(self, model, x, size: Optional[torch.Tensor], labels=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

        core = self.core(model)
        seq = core.post_layernorm(x)
        if core is model:
            if labels is not None:
                raise TypeError("SiglipVisionModel has no classifier: labels= needs SiglipForImageClassification")
            pooled = self.pool(model, core.head, seq, size) if core.use_head else None
            return BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=pooled)
        logits = model.classifier(weighted_mean(seq, size))
        return ImageClassifierOutput(loss=self.loss(model, labels, logits), logits=logits)
