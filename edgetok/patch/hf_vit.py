"""Hugging Face transformers ViT: ViTModel and ViTForImageClassification (ViTLayer).

ViTForMaskedImageModeling is left out: its decoder reshapes every patch token
back into an image, which a reduced token set cannot give.
"""
from __future__ import annotations

from typing import Optional

import torch

from .hf_common import HFAdapter, LayerSpec, loaded_classes


class HFViTAdapter(HFAdapter):
    family = "hf-vit"
    examples = "Hugging Face transformers ViTModel, ViTForImageClassification"
    module = "transformers.models.vit.modeling_vit"
    class_names = ("ViTModel", "ViTForImageClassification")
    layer_names = ("ViTLayer",)
    spec = LayerSpec(
        norm1="layernorm_before",
        attn="attention",
        out_proj="o_proj",
        norm2="layernorm_after",
        mlp="mlp",
        heads="num_attention_heads",
        scale="scaling",
        dropout="dropout",
    )

    def core(self, model):
        return model if isinstance(model, loaded_classes(self.module, "ViTModel")) else model.vit

    def blocks(self, model):
        return self.core(model).layers

    def embed(self, model, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        core = self.core(model)
        self.check_image(pixel_values, self.info(model), dynamic=bool(interpolate_pos_encoding))
        pixel_values = pixel_values.to(core.embeddings.patch_embeddings.projection.weight.dtype)
        return core.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))

    def finish(self, model, x, size: Optional[torch.Tensor], labels=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

        core = self.core(model)
        seq = core.layernorm(x)
        if core is model:
            if labels is not None:
                raise TypeError("ViTModel has no classifier: labels= needs ViTForImageClassification")
            pooled = core.pooler(seq) if core.pooler is not None else None  # the pooler reads the class token
            return BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=pooled)
        logits = model.classifier(seq[:, 0])
        return ImageClassifierOutput(loss=self.loss(model, labels, logits), logits=logits)
