"""Hugging Face transformers CLIP vision tower: CLIPVisionModel,
CLIPVisionModelWithProjection and CLIPForImageClassification (CLIPEncoderLayer).

CLIP pools the class token (after post_layernorm); CLIPForImageClassification
averages the patch tokens, which the reduced model does weighted by token size.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import weighted_mean
from .hf_common import HFAdapter, LayerSpec, loaded_classes


class HFCLIPAdapter(HFAdapter):
    family = "hf-clip"
    examples = "Hugging Face transformers CLIPVisionModel, CLIPVisionModelWithProjection, CLIPForImageClassification"
    module = "transformers.models.clip.modeling_clip"
    class_names = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPForImageClassification")
    layer_names = ("CLIPEncoderLayer",)
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
        return model if isinstance(model, loaded_classes(self.module, "CLIPVisionModel")) else model.vision_model

    def blocks(self, model):
        return self.core(model).encoder.layers

    def embed(self, model, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        core = self.core(model)
        self.check_image(pixel_values, self.info(model), dynamic=bool(interpolate_pos_encoding))
        return core.pre_layrnorm(core.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding)))

    def finish(self, model, x, size: Optional[torch.Tensor], labels=None):
        from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

        core = self.core(model)
        if isinstance(model, loaded_classes(self.module, "CLIPForImageClassification")):
            # like the original: mean of the patch tokens before post_layernorm
            logits = model.classifier(weighted_mean(x[:, 1:], None if size is None else size[:, 1:]))
            return ImageClassifierOutput(loss=self.loss(model, labels, logits), logits=logits)
        if labels is not None:
            raise TypeError(f"{type(model).__name__} has no classifier: labels= needs CLIPForImageClassification")
        pooled = core.post_layernorm(x[:, 0])
        if core is model:
            return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)
        from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

        return CLIPVisionModelOutput(image_embeds=model.visual_projection(pooled), last_hidden_state=x)
