"""Hugging Face transformers DINOv2: Dinov2Model and Dinov2ForImageClassification
(Dinov2Layer, layer scale, MLP or SwiGLU), and the register-token variant
Dinov2WithRegistersModel / ...ForImageClassification.

The class token and the register tokens are protected (num_prefix = 1 +
registers). DINOv2 always interpolates its position embeddings, so any image
size that is a multiple of the patch size is accepted. The classifier's mean
over patch tokens is size-weighted.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import weighted_mean
from .hf_common import HFAdapter, LayerSpec, loaded_classes


class HFDinov2Adapter(HFAdapter):
    family = "hf-dinov2"
    examples = "Hugging Face transformers Dinov2Model, Dinov2ForImageClassification"
    module = "transformers.models.dinov2.modeling_dinov2"
    class_names = ("Dinov2Model", "Dinov2ForImageClassification")
    layer_names = ("Dinov2Layer",)
    base_name = "Dinov2Model"
    core_attr = "dinov2"  # the backbone inside the classification model
    spec = LayerSpec(
        norm1="norm1",
        attn="attention",
        out_proj="o_proj",
        norm2="norm2",
        mlp="mlp",
        heads="num_attention_heads",
        scale="scaling",
        ls1="layer_scale1",
        ls2="layer_scale2",
        drop_path="drop_path",
    )

    def core(self, model):
        is_base = isinstance(model, loaded_classes(self.module, self.base_name))
        return model if is_base else getattr(model, self.core_attr)

    def blocks(self, model):
        return self.core(model).encoder.layer

    def embed(self, model, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = True) -> torch.Tensor:
        self.check_image(pixel_values, self.info(model), dynamic=True)
        return self.core(model).embeddings(pixel_values)

    def finish(self, model, x, size: Optional[torch.Tensor], labels=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

        core = self.core(model)
        seq = core.layernorm(x)
        if core is model:
            if labels is not None:
                raise TypeError(
                    f"{type(model).__name__} has no classifier: labels= needs the ForImageClassification model"
                )
            return BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=seq[:, 0])
        p = self.num_prefix(model)
        patches = weighted_mean(seq[:, p:], None if size is None else size[:, p:])
        logits = model.classifier(torch.cat([seq[:, 0], patches], dim=1))
        return ImageClassifierOutput(loss=self.loss(model, labels, logits), logits=logits)


class HFDinov2RegistersAdapter(HFDinov2Adapter):
    family = "hf-dinov2-registers"
    examples = "Hugging Face transformers Dinov2WithRegistersModel, Dinov2WithRegistersForImageClassification"
    module = "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers"
    class_names = ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification")
    layer_names = ("Dinov2WithRegistersLayer",)
    base_name = "Dinov2WithRegistersModel"
    core_attr = "dinov2_with_registers"

    def num_prefix(self, model) -> int:
        return 1 + self.core(model).config.num_register_tokens
