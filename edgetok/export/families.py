"""Export descriptions of the model families that are not image ViTs: the three
methods made for them (Focus-DETR on DETR and Deformable-DETR, MrT5, FlexDiT) export through the same
exporter as every other method.

One object per family, as Hugging Face Optimum's exporters do: it declares the
inputs (names, dtypes, which axis is the batch, how to make an example at a
given size) and how to call the model, and the generic code in exporter.py
traces, checks and writes it. Image ViTs do not need one: their adapter
(edgetok.patch) already says all of that.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import EdgetokError, UnsupportedModelError

# batch, size, generator -> {input name: tensor}
Inputs = Callable[[nn.Module, int, Sequence[int], torch.Generator], dict]


@dataclass(frozen=True)
class FamilyExport:
    family: str
    describes: str  # for error messages
    matches: Callable[[nn.Module], bool]
    inputs: Inputs
    default_size: tuple[int, ...]  # what --input-size means: (H, W) images, (L,) sequences
    run: Callable[[nn.Module, dict], dict]  # model, inputs -> {output name: tensor}
    prepare: Callable[[nn.Module], nn.Module] = lambda m: m  # a static-shape form of the model

    def outputs(self, model: nn.Module, example: dict) -> list[str]:
        with torch.no_grad():
            return list(self.run(model, example))


def _tensors(out) -> dict:
    """ModelOutput / tuple / tensor -> {name: tensor}, tensors only, in order."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}


# -- Hugging Face DETR (Focus-DETR) -------------------------------------------------
def _is_detr(model) -> bool:
    try:
        from ..patch.hf_detr import detr_encoder

        detr_encoder(model)
        return True
    except UnsupportedModelError:
        return False


def _detr_inputs(model, batch, size, gen):
    return {"pixel_values": torch.randn(batch, 3, *size, generator=gen)}


DETR = FamilyExport(
    "hf-detr", "Hugging Face DetrModel / DetrForObjectDetection (pixel_values [B,3,H,W])", _is_detr, _detr_inputs,
    (512, 512), lambda m, x: _tensors(m(pixel_values=x["pixel_values"])))


def _is_deformable_detr(model) -> bool:
    from ..patch.hf_deformable_detr import is_deformable_detr

    return is_deformable_detr(model)


def _eager_attention(model):
    """A copy whose decoder self-attention runs transformers' eager attention: torch.onnx's
    decomposition of the SDPA path can emit a view of a transposed tensor that fails to
    export (it depends on what the process exported before); the ONNX graph is the same
    matmul-softmax-matmul either way."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    return model


DEFORMABLE_DETR = FamilyExport(
    "hf-deformable-detr", "Hugging Face DeformableDetrModel / DeformableDetrForObjectDetection (pixel_values "
    "[B,3,H,W])", _is_deformable_detr, _detr_inputs, (512, 512),
    lambda m, x: _tensors(m(pixel_values=x["pixel_values"])), _eager_attention)


# -- Hugging Face T5 / ByT5 encoder (MrT5) ------------------------------------------
def _is_t5_encoder(model) -> bool:
    try:
        from transformers import T5EncoderModel
    except ImportError:
        return False
    return isinstance(model, T5EncoderModel)


def _t5_inputs(model, batch, size, gen):
    (length,) = size
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.int64)}


T5_ENCODER = FamilyExport(
    "hf-t5-encoder", "Hugging Face T5EncoderModel (input_ids, attention_mask [B,L])", _is_t5_encoder, _t5_inputs,
    (256,), lambda m, x: _tensors(m(input_ids=x["input_ids"], attention_mask=x["attention_mask"])))


# -- edgetok's DiT block stack (FlexDiT) ---------------------------------------------
def _is_dit(model) -> bool:
    from ..patch.dit import DiT

    return isinstance(model, DiT)


def _dit_inputs(model, batch, size, gen):
    t = torch.full((batch,), 500, dtype=torch.int64)  # one timestep per batch, as FlexDiT needs
    return {"x": torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=gen),
            "t": t, "y": torch.randint(0, model.y_embedder.num_embeddings - 1, (batch,), generator=gen)}


def _dit_static(model):
    """FlexDiT picks its pooling factor from the timestep: a graph has one factor, so a
    plan with one density stage exports at that factor and several stages are refused."""
    plan = getattr(model, "edgetok_plan", None)
    if plan is None or plan.method != "flexdit" or "fixed_factor" in plan.params:
        return model
    stages = plan.params["stages"]
    if len(stages) != 1:
        raise EdgetokError(
            f"FlexDiT stages {list(stages)} give a timestep-dependent factor, which one ONNX graph cannot hold; "
            "export one density stage per graph, e.g. --param 'stages=[[0, 2]]' (then [[0, 1]] for the dense one)"
        )
    from ..patch.dit import at_factor

    return at_factor(model, stages[0][1])


DIT = FamilyExport(
    "dit", "edgetok.patch.dit.DiT (x [B,C,S,S], t [B], y [B])", _is_dit, _dit_inputs, (),
    lambda m, x: {"output": m(x["x"], x["t"], x["y"])}, _dit_static)

FAMILIES = (DETR, DEFORMABLE_DETR, T5_ENCODER, DIT)


def family_for(model: nn.Module) -> Optional[FamilyExport]:
    return next((f for f in FAMILIES if f.matches(model)), None)


def size_for(family: FamilyExport, input_size: Optional[Sequence[int]]) -> tuple[int, ...]:
    if input_size is None:
        return family.default_size
    size = tuple(int(s) for s in input_size)
    if len(size) != len(family.default_size) or min(size, default=1) < 1:
        want = {2: "H,W", 1: "L", 0: "nothing (its size is the model's)"}[len(family.default_size)]
        raise EdgetokError(f"--input-size {','.join(map(str, size))} does not fit {family.describes}: give {want}")
    return size
