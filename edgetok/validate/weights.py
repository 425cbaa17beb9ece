"""Proof that a weight mapping reproduces its source: ``verify_against_onnx(model, onnx)``
adds the ONNX graph's hidden states (the input of every block's first LayerNorm, and the
final norm) as outputs, runs them in ONNX Runtime without graph fusions, and compares
every stage with the torch model's (edgetok/patch/weights.py maps the weights)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from ..patch.weights import WeightsError, _depth

PathLike = Union[str, Path]


@dataclass
class MappingReport:
    """Max absolute difference, per hidden state, between ONNX Runtime and torch."""

    stages: list[str]
    max_abs: list[float]
    scale: list[float]  # max |value| of each ONNX hidden state, for context
    atol: float

    @property
    def worst(self) -> float:
        return max(self.max_abs)

    @property
    def ok(self) -> bool:
        return self.worst <= self.atol

    def __str__(self) -> str:
        rows = [f"  {s:>10s}: max|diff| {d:.2e} (max|x| {m:.1f})" for s, d, m in zip(self.stages, self.max_abs, self.scale)]
        return f"{'OK' if self.ok else 'FAILED'} (atol {self.atol:g}, worst {self.worst:.2e})\n" + "\n".join(rows)


def _layernorm_io(g, weight: str) -> tuple[str, str]:
    """(input, output) of the layer norm whose scale is initializer ``weight``:
    a LayerNormalization node, or the decomposed Sub/Div/Mul/Add chain."""
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in consumers.get(weight, []):
        if n.op_type == "LayerNormalization":
            return n.input[0], n.output[0]
        if n.op_type == "Mul":
            div = producer[next(i for i in n.input if i != weight)]
            sub = producer[div.input[0]]
            add = next((c for c in consumers.get(n.output[0], []) if c.op_type == "Add"), None)
            if div.op_type == "Div" and sub.op_type == "Sub":
                return sub.input[0], add.output[0] if add is not None else n.output[0]
    raise WeightsError(f"cannot find the layer norm using {weight!r} in the ONNX graph")


def onnx_hidden_states(onnx_path: PathLike, x: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Hidden states of an HF-DINOv2-style ONNX backbone on ``x``: the input of
    every block, the last block's output and the final norm's output, read by
    adding them as graph outputs and running ONNX Runtime."""
    import onnx

    model = onnx.load(str(onnx_path))
    g = model.graph
    names = {i.name for i in g.initializer}
    names |= {n.output[0] for n in g.node if n.op_type == "Identity" and n.input[0] in names}
    prefix = next((k[: -len("embeddings.cls_token")] for k in names if k.endswith("embeddings.cls_token")), "")
    depth = _depth({k[len(prefix):]: None for k in names if k.startswith(prefix)}, r"encoder\.layer\.(\d+)\.")
    if depth == 0:
        raise WeightsError(f"{onnx_path}: no HF DINOv2 encoder layers found (expected '{prefix}encoder.layer.N.*')")
    taps = [_layernorm_io(g, f"{prefix}encoder.layer.{i}.norm1.weight")[0] for i in range(depth)]
    taps += list(_layernorm_io(g, f"{prefix}layernorm.weight"))
    stages = ["embed"] + [f"block{i}" for i in range(depth)] + ["norm"]
    for d, name in zip(g.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        d.dim_param = name  # the traced graph resamples positions per input: let other sizes in
    del g.output[:]
    g.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in taps)
    from ..runtime.backends import ort_session

    sess = ort_session(model, optimize=False)  # exact reference, no fusions
    return stages, sess.run(taps, {g.input[0].name: x.astype(np.float32)})


def torch_hidden_states(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The same hidden states from a timm ViT or an HF Dinov2Model."""
    with torch.no_grad():
        if hasattr(model, "blocks"):
            h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
            out = [h]
            for blk in model.blocks:
                h = blk(h)
                out.append(h)
            return out + [model.norm(h)]
        res = model(pixel_values=x, output_hidden_states=True)
        return list(res.hidden_states) + [res.last_hidden_state]


def verify_against_onnx(model: nn.Module, onnx_path: PathLike, x: torch.Tensor, atol: float = 1e-4,
                        raise_on_fail: bool = True) -> MappingReport:
    """Compare every hidden state of ``model`` with the ONNX backbone's on ``x``."""
    stages, ref = onnx_hidden_states(onnx_path, x.numpy())
    mine = torch_hidden_states(model, x)
    if len(mine) != len(ref):
        raise WeightsError(f"the torch model has {len(mine) - 2} blocks, the ONNX backbone {len(ref) - 2}")
    diffs = [float(np.abs(m.numpy() - r).max()) for m, r in zip(mine, ref)]
    report = MappingReport(stages, diffs, [float(np.abs(r).max()) for r in ref], atol)
    if raise_on_fail and not report.ok:
        raise WeightsError(f"torch model does not reproduce {onnx_path}:\n{report}")
    return report
