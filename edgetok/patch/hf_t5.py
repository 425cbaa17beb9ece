"""Hugging Face T5 / ByT5 encoder (T5EncoderModel) with MrT5's delete gate.

The T5 encoder is not an image ViT (relative position bias shared by all
layers, RMS norm, unscaled attention, text attention mask), so it does not go
through ``adapter_for``. The encoder stack of a copy of the model gets a
subclass whose forward runs the same layers with the delete step after one
block; the gate is registered under ``encoder.mrt5_steps``. The output carries the
shortened sequence, its attention mask and the kept positions, which a
decoder must use as its encoder attention mask.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import EdgetokError, UnsupportedModelError
from ..reduce.mrt5 import GATE_SCALE, build_mrt5
from ..reduce.registry import register_method
from .hf_detr import swap_forward


def t5_encoder(model: nn.Module) -> nn.Module:
    try:
        from transformers import T5EncoderModel
    except ImportError:
        raise UnsupportedModelError("MrT5 needs transformers (pip install transformers)") from None
    if not isinstance(model, T5EncoderModel):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers T5EncoderModel; MrT5 here patches the encoder-only "
            "model (a seq2seq model's decoder would need the shortened mask: use model.get_encoder() weights "
            "in a T5EncoderModel)"
        )
    return model.encoder


def _output_class():
    from transformers.modeling_outputs import BaseModelOutput

    @dataclass
    class MrT5EncoderOutput(BaseModelOutput):
        """last_hidden_state [B,M,C], attention_mask [B,M] (0 = deleted slot),
        kept_indices [B,M] (input position of every slot)."""

        attention_mask: Optional[torch.Tensor] = None
        kept_indices: Optional[torch.Tensor] = None

    return MrT5EncoderOutput


def key_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    """[B,N] 1/0 mask -> additive [B,1,1,N]."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        mask == 0, torch.finfo(dtype).min)[:, None, None]


def self_attention(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """T5LayerSelfAttention: x + o(attn(RMSNorm(x))), logits unscaled plus ``bias`` [B,H,N,N]."""
    a = layer.SelfAttention
    b, n, _ = x.shape
    h = layer.layer_norm(x)
    q, k, v = (p(h).view(b, n, a.n_heads, a.key_value_proj_dim).transpose(1, 2) for p in (a.q, a.k, a.v))
    # written out, not SDPA: the ONNX exporter's SDPA decomposition with a [B,H,N,N] float
    # bias yields strides its own reshape then rejects (torch 2.14)
    o = ((q @ k.transpose(-1, -2)) + bias).softmax(-1) @ v
    return x + layer.dropout(a.o(o.transpose(1, 2).reshape(b, n, -1)))


def gather_bias(pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows and columns ``idx`` [B,M] of a position bias [B,H,N,N] -> [B,H,M,M]."""
    h, n = pos.shape[1], pos.shape[-1]
    m = idx.shape[1]
    rows = pos.gather(2, idx[:, None, :, None].expand(-1, h, -1, n))
    return rows.gather(3, idx[:, None, None, :].expand(-1, h, m, -1))


def _mrt5_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **_):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    b, n, _ = x.shape
    mask = torch.ones(b, n, dtype=torch.long, device=x.device) if attention_mask is None else attention_mask
    pos = self.block[0].layer[0].SelfAttention.compute_bias(n, n, device=x.device).to(x.dtype).expand(b, -1, -1, -1)
    kept = torch.arange(n, device=x.device).expand(b, n)
    x = self.dropout(x)
    for block, step in zip(self.block, self.edgetok_plan.reducers):
        x = self_attention(block.layer[0], x, pos + key_bias(mask, x.dtype))
        x = block.layer[1](x)
        if step is not None:
            x, idx, mask = step(x, mask)
            pos = gather_bias(pos, idx)
            kept = kept.gather(1, idx)
    x = self.dropout(self.final_layer_norm(x))
    return _output_class()(last_hidden_state=x, attention_mask=mask, kept_indices=kept)


def reduce_t5(model: nn.Module, plan) -> nn.Module:
    """A copy of a T5EncoderModel whose encoder runs ``plan`` (see edgetok.reduce.mrt5)."""
    enc = t5_encoder(model)
    if hasattr(enc, "edgetok_plan"):
        raise EdgetokError("this T5 encoder is already reduced; apply MrT5 to the original model")
    if enc.config.is_decoder:
        raise UnsupportedModelError("MrT5 applies to a T5 encoder (config.is_decoder is True)")
    if len(plan.reducers) != len(enc.block):
        raise EdgetokError(f"the plan has {len(plan.reducers)} layers but the encoder has {len(enc.block)}")
    reduced = copy.deepcopy(model)
    enc = reduced.encoder
    swap_forward(enc, _mrt5_forward, "MrT5")
    enc.mrt5_steps = nn.ModuleList([s for s in plan.reducers if s is not None])  # gate weights follow .to()
    enc.edgetok_plan = plan
    reduced.edgetok_plan = plan
    return reduced.train(model.training)


@register_method("mrt5", "MrT5 learned delete gate in a byte-level T5 encoder (hard deletion, fixed slot budget)", kind="model")
def mrt5(model: nn.Module, layer: int = 2, max_keep: Optional[int] = None, gate_path: Optional[str] = None,
          scale: float = GATE_SCALE, seed: int = 0) -> nn.Module:
    """An MrT5 copy of a Hugging Face T5EncoderModel (ByT5 or any T5 config); the method is
    edgetok/reduce/mrt5.py."""
    enc = t5_encoder(model)
    plan = build_mrt5(len(enc.block), 0, 0, dim=enc.config.d_model, layer=layer, max_keep=max_keep,
                      gate_path=gate_path, scale=scale, seed=seed)
    return reduce_t5(model, plan)
