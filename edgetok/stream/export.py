"""The streaming step with static shapes, exported to ONNX, and its ONNX Runtime runner.

One step = one frame of B streams: inputs (frame, ref, k_cache, v_cache,
token_cache, refresh[B]); outputs (tokens, changed_tokens, idx, valid,
changed, and the updated ref / k_cache / v_cache; ``tokens`` is the next
token_cache). The top-changed tokens are picked by ``edgetok::token_drop``
(one ``edgetok`` TokenDrop node whose standard-op body ORT runs as is).
Two graphs are written from the same step: ``delta`` (budget + prefix slots)
and ``full`` (every token, used for the first frame, periodic refreshes and
streams over the changed-share bound). The runner applies the same policy as
the torch StreamingEncoder with a budget, so both give the same tokens.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import EdgetokError, MissingDependencyError
from .encoder import StepOutput, StreamingEncoder, StreamState, default_budget

INPUTS = ["frame", "ref", "k_cache", "v_cache", "token_cache", "refresh"]
OUTPUTS = ["tokens", "changed_tokens", "idx", "valid", "changed", "ref_out", "k_cache_out", "v_cache_out"]
STATE = {"ref": "ref_out", "k_cache": "k_cache_out", "v_cache": "v_cache_out", "token_cache": "tokens"}


class StreamStep(nn.Module):
    """One static-shape step: ``keep`` slots (prefix included) for every frame."""

    def __init__(self, encoder: StreamingEncoder, keep: int):
        super().__init__()
        self.core, self.keep = encoder.core, keep

    def forward(self, frame, ref, k_cache, v_cache, token_cache, refresh):
        x = self.core.embed(frame)
        change = self.core.change(frame, x, ref)
        out, st = self.core(frame, x, change, refresh, StreamState(ref, k_cache, v_cache, token_cache), self.keep)
        return out.tokens, out.changed_tokens, out.idx, out.valid, out.changed, st.ref, st.k, st.v


class FullEncoder(nn.Module):
    """Plain per-frame encoding (every token, every block): the baseline the stream is timed against."""

    def __init__(self, model: nn.Module, mean=None, std=None):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, frame):
        from .encoder import encode_full

        return encode_full(self.model, frame, self.mean, self.std)


def _onnx_export(module: nn.Module, args: tuple, path: Path, opset: int, inputs=INPUTS, outputs=OUTPUTS) -> None:
    """torch -> ONNX through the dynamo exporter with the edgetok op translations and bodies."""
    import onnx

    from ..ops.onnx import add_functions, custom_translation_table

    with torch.no_grad():
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=inputs,
                                 output_names=outputs, custom_translation_table=custom_translation_table(),
                                 verbose=False)
    model = add_functions(prog.model_proto)
    onnx.checker.check_model(model, full_check=True)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


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
    """Write stream_delta.onnx, stream_full.onnx and stream.json (the policy) to ``out_dir``."""
    core = encoder.core
    info = core.info
    budget = encoder.budget or default_budget(core.num_patches, encoder.max_changed_share)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = torch.zeros(batch, *info.input_shape)
    st = core.initial_state(frame)
    args = (frame, st.ref, st.k, st.v, st.tokens, torch.zeros(batch, dtype=torch.bool))
    graphs = {"delta": "stream_delta.onnx", "full": "stream_full.onnx"}
    for name, keep in (("delta", budget + info.num_prefix), ("full", info.tokens)):
        _onnx_export(StreamStep(encoder, keep).eval(), args, out / graphs[name], opset)
    manifest = {
        "kind": "edgetok-stream", "graphs": graphs, "batch": batch, "budget": budget,
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
    tmp = out / "stream.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "stream.json")
    return StreamExport(out, manifest)


def export_full(model: nn.Module, path, batch: int = 1, opset: int = 18, mean=None, std=None) -> Path:
    """The plain encoder (frame -> tokens [B,N,C]) as ONNX, for timing the stream against it in ORT
    (``mean``/``std``: the normalisation inside, as in StreamingEncoder)."""
    from .encoder import _adapter

    info = _adapter(model).info(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _onnx_export(FullEncoder(model, mean, std).eval(), (torch.zeros(batch, *info.input_shape),), path, opset, ["frame"], ["tokens"])
    return path


class OrtStreamingEncoder:
    """Runs an exported streaming step in ONNX Runtime with the torch encoder's policy.
    ``step(frame [B,C,H,W] numpy) -> StepOutput`` (numpy arrays in torch tensors' places)."""

    def __init__(self, path, providers: Optional[list] = None, threads: Optional[int] = None,
                 interleaved: bool = True):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingDependencyError("onnxruntime is needed to run the exported stream: pip install onnxruntime") from e
        root = Path(path)
        mf = root / "stream.json"
        if not mf.is_file():
            raise EdgetokError(f"{root} has no stream.json; write it with edgetok.stream.export.export_stream")
        self.manifest = json.loads(mf.read_text())
        from ..timing import ort_session_options

        # the delta and full graphs take turns (every refresh), so by default their idle threads do not spin
        opts = ort_session_options(threads, interleaved)
        prov = providers or ["CPUExecutionProvider"]
        g = self.manifest["graphs"]
        self.delta = ort.InferenceSession(str(root / g["delta"]), opts, providers=prov)
        self.full = ort.InferenceSession(str(root / g["full"]), opts, providers=prov)
        self.reset()

    def reset(self) -> None:
        self.state: Optional[dict] = None
        self.frame_index = 0
        self.refreshed: Optional[np.ndarray] = None

    def _run(self, sess, frame, refresh) -> dict:
        feeds = {"frame": frame, "refresh": refresh, **self.state}
        return dict(zip(OUTPUTS, sess.run(OUTPUTS, feeds)))

    def step(self, frame) -> StepOutput:
        m = self.manifest
        frame = np.ascontiguousarray(frame, dtype=np.float32)
        if list(frame.shape) != m["input_shape"]:
            raise EdgetokError(f"frame shape {list(frame.shape)} != exported {m['input_shape']}; resize or re-export")
        b = frame.shape[0]
        k = m["refresh_every"]
        if self.state is None or (k > 0 and self.frame_index % k == 0):
            if self.state is None:
                self.state = {n: np.zeros(s, np.float32) for n, s in m["state_shapes"].items()}
            refresh = np.ones(b, bool)
            out = self._run(self.full, frame, refresh)
        else:
            refresh = np.zeros(b, bool)
            out = self._run(self.delta, frame, refresh)
            over = out["changed"] > m["max_changed_share"] * m["num_patches"]
            if over.any():  # the share bound refreshes those streams: rerun in full from the same state
                refresh = over
                out = self._run(self.full, frame, refresh)
        self.state = {n: out[o] for n, o in STATE.items()}
        self.refreshed = refresh
        self.frame_index += 1
        return StepOutput(*(out[n] for n in OUTPUTS[:5]))


class EncoderSession:
    """The exported stream as a Session-like token source for edgetok.runtime.StreamSession:
    ``output_names == ["tokens"]`` and ``run(frame) -> {"tokens": [1,N,C]}`` (the full map,
    unchanged tokens from the cache), so StreamSession's DTD then hands on only the tokens
    that changed while the encoder skips computing the unchanged ones."""

    output_names = ["tokens"]

    def __init__(self, stream: OrtStreamingEncoder):
        self.stream = stream

    def run(self, frame) -> dict:
        x = frame.detach().cpu().numpy() if hasattr(frame, "detach") else np.asarray(frame)
        if x.ndim == 3:
            x = x[None]
        return {"tokens": self.stream.step(x).tokens}

    def reset(self) -> None:
        self.stream.reset()
