"""The packed many-stream step (edgetok.patch.multistream.MultiStreamEncoder) as ONNX, run
by edgetok.runtime.multistream.OrtMultiStreamEncoder.

``multistream_change.onnx``: (frame [N,C,H,W], ref) -> change [N, patches];
``multistream_refresh.onnx``: (frames of the streams that refresh, any number) ->
their (tokens, ref, k_cache, v_cache) through the plain blocks;
``multistream_step.onnx``: (frame, ref, k_cache, v_cache, token_cache, stream [T],
pos [T], slot [T], pad [W]) -> (tokens, computed [T,C], ref_out, k_cache_out,
v_cache_out), with T (tokens computed over all streams) and W (the largest
count of one stream) dynamic, so a frame runs exactly the tokens it computes: no
fixed budget of slots. ``multistream.json``: the streams, the shapes and the
policy the runner applies between the two graphs.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..patch.multistream import MultiStreamEncoder, pack
from ..patch.stream import StreamState
from ..runtime.artifacts import write_atomic, write_json
from ..runtime.multistream import CHANGE_INPUTS, CHANGE_OUTPUTS, KIND, REFRESH_OUTPUTS, STEP_INPUTS, STEP_OUTPUTS


class PackedStep(nn.Module):
    def __init__(self, encoder: MultiStreamEncoder):
        super().__init__()
        self.core, self.packed = encoder.core, encoder.packed

    def forward(self, frame, ref, k_cache, v_cache, token_cache, stream, pos, slot, pad):
        x = self.core.embed(frame)
        tokens, computed, st = self.packed(frame, x, StreamState(ref, k_cache, v_cache, token_cache), stream, pos,
                                           slot, pad)
        return tokens, computed, st.ref, st.k, st.v


class RefreshRows(nn.Module):
    """The streams that refresh (any number: a dynamic batch) through the plain blocks:
    frame -> (tokens, ref, k_cache, v_cache) rows for them."""

    def __init__(self, encoder: MultiStreamEncoder):
        super().__init__()
        self.core = encoder.core

    def forward(self, frame):
        x = self.core.embed(frame)
        _, st = self.core.refresh(frame, x, x.new_zeros(x.shape[0], self.core.num_patches))
        return st.tokens, st.ref, st.k, st.v


class ChangeMap(nn.Module):
    def __init__(self, encoder: MultiStreamEncoder):
        super().__init__()
        self.core = encoder.core

    def forward(self, frame, ref):
        x = self.core.embed(frame) if self.core.mode == "feature" else None
        return self.core.change(frame, x, ref)


class BatchFullEncoder(nn.Module):
    """Plain encoding of N frames as one batch (every token, every block, the normalisation
    built once, outside the traced forward): the baseline the packed step is timed against."""

    def __init__(self, model: nn.Module, mean=None, std=None):
        super().__init__()
        from ..patch.stream import Normalize, _adapter

        self.model, self.adapter = model, _adapter(model)
        self.normalize = Normalize(mean, std, self.adapter.info(model).in_chans)

    def forward(self, frame):
        from ..patch.base import run_blocks

        return run_blocks(self.adapter, self.model, self.adapter.embed(self.model, self.normalize(frame)))[0]


def export_full_batch(model: nn.Module, path, streams: int, opset: int = 18, mean=None, std=None) -> Path:
    """The plain encoder for ``streams`` frames at once (frame [N,C,H,W] -> tokens [N,T,C]) as ONNX."""
    from .exporter import check_proto, trace

    enc = BatchFullEncoder(model, mean, std).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = trace(enc, (torch.zeros(streams, *enc.adapter.info(model).input_shape),), ["frame"], opset, ["tokens"])
    check_proto(proto)
    write_atomic(path, proto.SerializeToString())
    return path


def _example(encoder: MultiStreamEncoder, streams: int):
    """Step inputs with a packing that is neither 0/1 nor equal to another size (dynamic axes stay free)."""
    info = encoder.info
    frame = torch.rand(streams, *info.input_shape, generator=torch.Generator().manual_seed(0))
    st = encoder.core.initial_state(frame)
    select = torch.zeros(streams, info.tokens, dtype=torch.bool)
    select[:, :info.num_prefix] = True
    select[0, info.num_prefix:info.num_prefix + 2] = True
    k = pack(select)
    w = k.width + 1  # a wider attention layout than needed is valid (its extra rows are discarded)
    slot = k.stream * w + (k.slot - k.stream * k.width)
    return frame, st, (frame, st.ref, st.k, st.v, st.tokens, k.stream, k.pos, slot, frame.new_zeros(w))


def export_multistream(encoder: MultiStreamEncoder, out_dir, opset: int = 18) -> Path:
    """Write multistream_{change,step}.onnx and multistream.json for ``encoder``'s streams."""
    from .exporter import check_proto, trace

    streams, info = encoder.policy.streams, encoder.info
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame, st, args = _example(encoder, streams)
    t, w = torch.export.Dim("packed", min=1, max=streams * info.tokens), torch.export.Dim("width", min=1,
                                                                                         max=info.tokens)
    dyn = {"frame": None, "ref": None, "k_cache": None, "v_cache": None, "token_cache": None,
           "stream": {0: t}, "pos": {0: t}, "slot": {0: t}, "pad": {0: w}}
    graphs = {n: f"multistream_{n}.onnx" for n in ("change", "step", "refresh")}
    rows = torch.cat([frame, frame[:1]]) if streams == 1 else frame  # the refresh graph's batch: 2 at tracing
    for name, module, a, ins, outs, d in (
            ("change", ChangeMap(encoder), (frame, st.ref), CHANGE_INPUTS, CHANGE_OUTPUTS, None),
            ("step", PackedStep(encoder), args, STEP_INPUTS, STEP_OUTPUTS, dyn),
            ("refresh", RefreshRows(encoder), (rows,), ["frame"], REFRESH_OUTPUTS,
             {"frame": {0: torch.export.Dim("rows", min=1, max=max(streams, 2))}})):
        proto = trace(module.eval(), a, ins, opset, outs, dynamic_shapes=d)
        check_proto(proto)
        write_atomic(out / graphs[name], proto.SerializeToString())
    pol, core = encoder.policy, encoder.core
    manifest = {
        "kind": KIND, "format": 1, "graphs": graphs, "streams": streams, "num_prefix": info.num_prefix,
        "num_patches": core.num_patches, "tokens": info.tokens, "dim": info.dim, "family": info.family,
        "input_shape": [streams, *info.input_shape], "mode": core.mode, "compare": core.compare,
        "policy": {"threshold": pol.threshold, "refresh_every": pol.refresh_every,
                   "max_changed_share": pol.max_changed_share, "budget": pol.budget,
                   "drift": asdict(pol.drift) if pol.drift else None, "phases": pol.phases},
        "normalize": {"mean": core.normalize.mean.flatten().tolist(), "std": core.normalize.std.flatten().tolist()}
        if core.normalize.active else None,
        "state_shapes": {"ref": list(st.ref.shape), "k_cache": list(st.k.shape), "v_cache": list(st.v.shape),
                         "token_cache": list(st.tokens.shape)},
    }
    write_json(out / "multistream.json", manifest)
    return out
