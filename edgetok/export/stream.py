"""The streaming step with static shapes, exported to ONNX, and its ONNX Runtime runner.

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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import EdgetokError, MissingDependencyError
from ..patch.stream import StepOutput, StreamingEncoder, StreamState, default_budget

INPUTS = ["frame", "ref", "k_cache", "v_cache", "token_cache", "refresh"]
OUTPUTS = ["tokens", "changed_tokens", "idx", "valid", "changed", "ref_out", "k_cache_out", "v_cache_out"]
STATE = {"ref": "ref_out", "k_cache": "k_cache_out", "v_cache": "v_cache_out", "token_cache": "tokens"}


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
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, frame):
        from ..patch.stream import encode_full

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
    tmp = out / "stream.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "stream.json")
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
            raise EdgetokError(f"{root} has no stream.json; write it with edgetok.export.stream.export_stream")
        self.manifest = json.loads(mf.read_text())
        from ..validate.timing import ort_session_options

        # the delta and full graphs take turns (every refresh), so by default their idle threads do not spin
        opts = ort_session_options(threads, interleaved)
        prov = providers or ["CPUExecutionProvider"]
        g = self.manifest["graphs"]
        missing = [n for n in ("change", "delta", "full") if n not in g]
        if missing:
            raise EdgetokError(f"{root} is a stream export of an older edgetok (no {', '.join(missing)} graph); "
                               "re-export it with edgetok.export.stream.export_stream")
        self.sessions = {n: ort.InferenceSession(str(root / f), opts, providers=prov) for n, f in g.items()}
        self.reset()

    def reset(self) -> None:
        self.state: Optional[dict] = None
        self.frame_index = 0
        self.refreshed: Optional[np.ndarray] = None

    def _run(self, graph: str, frame, refresh) -> dict:
        sess = self.sessions[graph]
        feeds = {"frame": frame, "refresh": refresh, **self.state}
        return dict(zip(OUTPUTS, sess.run(OUTPUTS, {i.name: feeds[i.name] for i in sess.get_inputs()})))

    def step(self, frame) -> StepOutput:
        m = self.manifest
        frame = np.ascontiguousarray(frame, dtype=np.float32)
        if list(frame.shape) != m["input_shape"]:
            raise EdgetokError(f"frame shape {list(frame.shape)} != exported {m['input_shape']}; resize or re-export")
        b = frame.shape[0]
        k = m["refresh_every"]
        if self.state is None:
            self.state = {n: np.zeros(s, np.float32) for n, s in m["state_shapes"].items()}
            refresh = np.ones(b, bool)
        elif k > 0 and self.frame_index % k == 0:
            refresh = np.ones(b, bool)
        else:  # the share bound refreshes the streams over it
            changed = self.sessions["change"].run(None, {"frame": frame, "ref": self.state["ref"]})[0]
            refresh = changed > m["max_changed_share"] * m["num_patches"]
        graph = "full" if refresh.all() else "mixed" if refresh.any() else "delta"
        out = self._run(graph, frame, refresh)
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
