"""The streaming step with static shapes, exported to ONNX (its ONNX Runtime runner is
OrtStreamingEncoder in edgetok/runtime/stream.py).

One step = one frame of B streams: inputs (frame, ref, k_cache, v_cache,
token_cache, refresh[B]); outputs (tokens, changed_tokens, idx, valid,
changed, and the updated ref / k_cache / v_cache; ``tokens`` is the next
token_cache). The top-changed tokens are picked by ``edgetok::token_drop``
(one ``edgetok`` TokenDrop node whose standard-op body ORT runs as is).
Graphs written from the same core: ``change`` (frame, ref -> changed patch
tokens per stream, so the runner knows which graph a frame needs before
running one), ``delta`` (budget + prefix slots), ``full`` (every stream
refreshed: the plain blocks keeping K/V, as cheap as full encoding; the first
frame, periodic refreshes, frames over the changed-share bound) and, for
batches of several streams, ``mixed`` (some streams refreshed: every token
through the step). The runner applies the same policy as the torch
StreamingEncoder with a budget, so both give the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..patch.stream import StreamingEncoder, StreamState, default_budget
from ..runtime.artifacts import write_json
from ..runtime.stream import INPUTS, OUTPUTS


def _step_outputs(out, st) -> tuple:
    """A step's graph outputs, in OUTPUTS order."""
    return out.tokens, out.changed_tokens, out.idx, out.valid, out.changed, st.ref, st.k, st.v


class StreamStep(nn.Module):
    """One static-shape step: ``keep`` slots (prefix included) for every frame."""

    def __init__(self, encoder: StreamingEncoder, keep: int):
        super().__init__()
        self.core, self.keep = encoder.core, keep

    def forward(self, frame, ref, k_cache, v_cache, token_cache, refresh):
        x = self.core.embed(frame)
        change = self.core.change(frame, x, ref)
        out, st = self.core(frame, x, change, refresh, StreamState(ref, k_cache, v_cache, token_cache), self.keep)
        return _step_outputs(out, st)


class StreamRefresh(nn.Module):
    """Every stream refreshed: (frame, ref) -> the step's outputs, through the plain blocks."""

    def __init__(self, encoder: StreamingEncoder):
        super().__init__()
        self.core = encoder.core

    def forward(self, frame, ref):
        x = self.core.embed(frame)
        out, st = self.core.refresh(frame, x, self.core.change(frame, x, ref))
        return _step_outputs(out, st)


class StreamChange(nn.Module):
    """(frame, ref) -> changed patch tokens per stream [B] (what decides the graph)."""

    def __init__(self, encoder: StreamingEncoder):
        super().__init__()
        self.core = encoder.core

    def forward(self, frame, ref):
        x = self.core.embed(frame) if self.core.mode == "feature" else None
        return (self.core.change(frame, x, ref) >= self.core.threshold).sum(1)


class FullEncoder(nn.Module):
    """Plain per-frame encoding (every token, every block): the baseline the stream is timed against."""

    def __init__(self, model: nn.Module, mean=None, std=None):
        from ..patch.stream import Normalize

        super().__init__()
        self.model = model
        self.normalize = Normalize(mean, std)  # checked here, once: a check inside forward cannot be traced

    def forward(self, frame):
        from ..patch.stream import encode_full

        return encode_full(self.model, self.normalize(frame))


def _onnx_export(module: nn.Module, args: tuple, path: Path, opset: int, inputs=INPUTS, outputs=OUTPUTS) -> None:
    """One stream graph through the exporter's trace (edgetok nodes + bodies), checked, written atomically."""
    from ..runtime.artifacts import write_atomic
    from .exporter import check_proto, trace

    model = trace(module.eval(), args, inputs, opset, outputs)
    check_proto(model)
    write_atomic(path, model.SerializeToString())


@dataclass
class StreamExport:
    root: Path
    manifest: dict

    @property
    def delta(self) -> Path:
        return self.root / self.manifest["graphs"]["delta"]

    @property
    def full(self) -> Path:
        return self.root / self.manifest["graphs"]["full"]


def export_stream(encoder: StreamingEncoder, out_dir, batch: int = 1, opset: int = 18) -> StreamExport:
    """Write stream_{change,delta,full}.onnx (and stream_mixed.onnx for batch > 1) and
    stream.json (the policy) to ``out_dir``."""
    core = encoder.core
    info = core.info
    budget = encoder.budget or default_budget(core.num_patches, encoder.max_changed_share)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = torch.zeros(batch, *info.input_shape)
    st = core.initial_state(frame)
    args = (frame, st.ref, st.k, st.v, st.tokens, torch.zeros(batch, dtype=torch.bool))
    graphs = {name: f"stream_{name}.onnx" for name in ("change", "delta", "full") + (("mixed",) if batch > 1 else ())}
    _onnx_export(StreamChange(encoder).eval(), (frame, st.ref), out / graphs["change"], opset, ["frame", "ref"],
                 ["changed"])
    _onnx_export(StreamStep(encoder, budget + info.num_prefix).eval(), args, out / graphs["delta"], opset)
    _onnx_export(StreamRefresh(encoder).eval(), (frame, st.ref), out / graphs["full"], opset, ["frame", "ref"])
    if batch > 1:
        _onnx_export(StreamStep(encoder, info.tokens).eval(), args, out / graphs["mixed"], opset)
    manifest = {
        "kind": "edgetok-stream", "format": 2, "graphs": graphs, "batch": batch, "budget": budget,
        "threshold": core.threshold, "mode": core.mode, "compare": core.compare,
        "refresh_every": encoder.refresh_every, "max_changed_share": encoder.max_changed_share,
        "normalize": {"mean": core.normalize.mean.flatten().tolist(), "std": core.normalize.std.flatten().tolist()}
        if core.normalize.active else None,
        "num_prefix": info.num_prefix, "num_patches": core.num_patches, "tokens": info.tokens, "dim": info.dim,
        "input_shape": [batch, *info.input_shape], "family": info.family,
        "state_shapes": {"ref": list(st.ref.shape), "k_cache": list(st.k.shape), "v_cache": list(st.v.shape),
                         "token_cache": list(st.tokens.shape)},
        "inputs": INPUTS, "outputs": OUTPUTS,
    }
    write_json(out / "stream.json", manifest)
    return StreamExport(out, manifest)


def export_full(model: nn.Module, path, batch: int = 1, opset: int = 18, mean=None, std=None) -> Path:
    """The plain encoder (frame -> tokens [B,N,C]) as ONNX, for timing the stream against it in ORT
    (``mean``/``std``: the normalisation inside, as in StreamingEncoder)."""
    from ..patch.stream import _adapter

    info = _adapter(model).info(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _onnx_export(FullEncoder(model, mean, std).eval(), (torch.zeros(batch, *info.input_shape),), path, opset, ["frame"], ["tokens"])
    return path
