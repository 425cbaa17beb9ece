"""Export of one streaming DTD step (differential token drop, TimeChat-Online,
Yao et al. 2025, arXiv:2504.17343; the rule is edgetok.reduce.dtd).

DTD is an output-stage method: the encoder runs on every frame and the tokens
that hardly changed since the previous frame are dropped after it. Its state
(the previous frame's tokens) lives outside the graph, so the exported model
is one step with the state as an explicit input and output::

    (pixel_values [B,3,H,W], prev_tokens [B,N,C])
        -> kept_tokens [B,M,C] (zero-padded), kept_idx [B,M] (-1 = padding),
           kept_count [B], tokens [B,N,C] (feed back as the next prev_tokens)

with one ``edgetok`` DiffDrop node after the encoder. On the first frame feed
``prev_tokens`` = zeros: every token's change against a zero vector is exactly
1, so thresholds <= 1 keep all of them, as DTDStream does on its first frame
(that is why thresholds above 1 are refused here). Only the paper's
feature-level rule exports; the pixel-level rule would need the previous
frame's pixels as a second state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .exporter import (INPUT_NAME, TOLERANCE, ExportError, ExportJob, ExportResult, refuse_adaptive, resolve_target,
                       run_export)

STATE_INPUT = "prev_tokens"
OUTPUTS = ("kept_tokens", "kept_idx", "kept_count", "tokens")


class DTDStep(nn.Module):
    """One DTDStream step with its state made explicit, as a module torch.export traces."""

    def __init__(self, stream):
        super().__init__()
        if stream.mode != "feature":
            raise ExportError(f"dtd mode {stream.mode!r} does not export: only the feature rule does "
                              "(mode='feature'); the pixel rule needs the previous frame's pixels as state")
        if stream.threshold > 1:
            raise ExportError(f"dtd threshold {stream.threshold:g} > 1 does not export: the first frame is fed "
                              "prev_tokens=zeros, which keeps every token only for thresholds <= 1")
        self.encoder = stream.encoder
        self.threshold, self.num_prefix = stream.threshold, stream.num_prefix

    def forward(self, pixel_values, prev_tokens):
        from ..patch.dtd import _encode

        tokens = _encode(self.encoder, pixel_values)
        kept, idx, count = torch.ops.edgetok.diff_drop(tokens, prev_tokens, self.threshold, self.num_prefix)
        return {"kept_tokens": kept, "kept_idx": idx, "kept_count": count, "tokens": tokens}


def _stream(model: nn.Module, threshold: Optional[float]):
    from ..patch.dtd import DTDStream

    if isinstance(model, DTDStream):
        if threshold is not None and threshold != model.threshold:
            raise ExportError(f"threshold {threshold:g} given for a DTDStream built with {model.threshold:g}")
        return model
    from ..patch.api import apply

    return apply(model, "dtd", threshold=0.1 if threshold is None else threshold, streaming=True)


def frames(shape: Sequence[int], batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """A short clip that exercises every case: new, static, partly changed (one
    stream only, so counts differ in the batch), and new again."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(batch, *shape, generator=gen)
    part = first.clone()
    h, w = shape[-2:]
    part[0, :, : h // 2, : w // 2] = torch.randn(shape[0], h // 2, w // 2, generator=gen)
    return [first, first.clone(), part, torch.randn(batch, *shape, generator=gen)]


def stream_parity(path: Path, stream, shape: Sequence[int], batches: Sequence[int] = (1, 2),
                  tolerance: float = TOLERANCE) -> dict:
    """Run a clip (``frames``) per batch size through the ONNX step in ONNX Runtime CPU
    and through DTDStream in torch: tokens within ``tolerance``, idx and count
    identical, frame by frame."""
    from ..runtime.backends import ort_session

    session = ort_session(path)
    errors = {}
    for b in batches:
        stream.reset()
        prev, worst = None, 0.0
        for t, x in enumerate(frames(shape, b)):
            with torch.no_grad():
                ref_tokens, ref_idx, ref_count = (v.numpy() for v in stream(x))
            feats = stream.prev_feats.numpy()
            got = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {
                INPUT_NAME: x.numpy(), STATE_INPUT: np.zeros_like(feats) if prev is None else prev})))
            prev = got["tokens"]
            if got["kept_tokens"].shape != ref_tokens.shape or not np.array_equal(got["kept_idx"], ref_idx) \
                    or not np.array_equal(got["kept_count"], ref_count):
                raise ExportError(f"batch {b} frame {t}: ONNX Runtime keeps {got['kept_count'].tolist()} tokens "
                                  f"(idx shape {list(got['kept_idx'].shape)}), torch keeps {ref_count.tolist()} "
                                  f"(idx shape {list(ref_idx.shape)})")
            err = max(float(np.abs(ref_tokens.astype(np.float64) - got["kept_tokens"]).max(initial=0.0)),
                      float(np.abs(feats.astype(np.float64) - got["tokens"]).max(initial=0.0)))
            if not err <= tolerance:
                raise ExportError(f"batch {b} frame {t}: ONNX Runtime differs from torch by {err:.3g} "
                                  f"(tolerance {tolerance:g})")
            worst = max(worst, err)
        errors[str(b)] = worst
    stream.reset()
    return {"batches": list(batches), "max_abs_err": errors, "tolerance": tolerance,
            "frames": len(frames(shape, 1))}


def export_dtd_step(model: nn.Module, output_dir, *, threshold: Optional[float] = None,
                    target: Optional[str] = None, opset: Optional[int] = None, batch: Optional[int] = None,
                    config=None, tolerance: float = TOLERANCE, check_parity: bool = True,
                    model_name: Optional[str] = None, preprocessing: Optional[dict] = None,
                    progress: Optional[Callable[[str], None]] = None, seed: Optional[int] = None,
                    force: bool = False, precision: Optional[str] = None, calibration=None) -> ExportResult:
    """Export one streaming DTD step of ``model`` (an encoder any edgetok adapter knows,
    or a DTDStream) to ``output_dir``/model.onnx + manifest.json, checked frame by
    frame against DTDStream (see the module docstring for the graph's contract).
    ``batch`` None gives a dynamic batch axis (named "batch"); an int fixes it.
    ``precision``: fp32 or fp16 (int8 calibration feeds images only; the step also reads its state)."""
    target, opset = resolve_target(target, opset, config)
    refuse_adaptive(config, "dtd")
    if (precision or (config.precision if config is not None else None)) == "int8":
        raise ExportError("a DTD streaming step cannot be calibrated for int8 (its calibration would need the "
                          "previous frame's tokens as well as images); export it with --precision fp16 or fp32")
    stream = _stream(model, threshold).eval()
    job = _dtd_job(stream, batch, tolerance, check_parity, model_name, preprocessing)
    return run_export(job, output_dir, target, opset, config, progress, seed, force, precision, calibration)


def _dtd_job(stream, batch: Optional[int], tolerance: float, check_parity: bool, model_name: Optional[str],
             preprocessing: Optional[dict]) -> ExportJob:
    from ..patch import adapter_for
    from ..patch.api import flops as _flops_of
    from ..patch.data_config import data_config as _pre

    dtd = DTDStep(stream).eval()
    info = adapter_for(stream.encoder).info(stream.encoder)
    shape, n = info.input_shape, info.tokens
    gen = torch.Generator().manual_seed(0)
    example = {INPUT_NAME: torch.randn(batch or 2, *shape, generator=gen),
               STATE_INPUT: torch.randn(batch or 2, n, info.dim, generator=gen)}
    report = _flops_of(stream.encoder, shape)
    fields = {
        "model": model_name or type(stream.encoder).__name__, "family": info.family, "method": "dtd",
        "params": {"threshold": stream.threshold, "mode": stream.mode, "streaming": True}, "adaptive": True,
        "tokens": report.tokens,
        "flops": {"total": report.total, "baseline": report.total, "ratio": 1.0, "layers": report.to_dict()["layers"]},
        "preprocessing": preprocessing if preprocessing is not None else _pre(stream.encoder, model_name, shape[-2:]),
        "schedule": {"source": "given"},
        "stream": {"kind": "dtd", "threshold": stream.threshold, "protect_first": stream.num_prefix,
                   "state_input": {"name": STATE_INPUT, "shape": ["batch" if batch is None else batch, n, info.dim],
                                   "dtype": "float32"},
                   "state_output": "tokens", "first_state": "zeros", "tokens": "kept_tokens", "idx": "kept_idx",
                   "count": "kept_count"},
    }
    check = (lambda path, batches: stream_parity(path, stream, shape, batches, tolerance)) if check_parity else None
    return ExportJob(dtd, example, list(OUTPUTS), batch is None, check, [batch] if batch else [1, 2],
                     "ONNX Runtime CPU parity over a clip", fields, dtd)
