"""manifest.json: what an exported model is, for the tools that load it.

The runtime, the TensorRT builder and the Triton repository writer read this
file next to model.onnx; the field names are a contract (``MANIFEST_VERSION``
changes when one does). Fields:

- ``manifest_version`` int, this schema's version.
- ``model`` str, the name the model was created from (timm/HF/torchvision name,
  ``module:pkg.mod:factory``, or the class name for a Python object).
- ``family`` str, the edgetok adapter family (``timm-vit``, ...) or export
  family (``hf-detr``, ``hf-t5-encoder``, ``dit``), or null.
- ``method`` str, the reduction method (``tome``, ``drop``, ...; ``none`` when unreduced).
- ``params`` dict, the method's resolved parameters; per-layer values
  (r, threshold) are lists with one entry per block, i.e. the schedule.
- ``adaptive`` bool, true when token counts depend on the input (dymu, dtd):
  ``tokens`` and ``flops`` are then upper bounds.
- ``opset`` int, the default-domain ONNX opset; ``edgetok_opset`` int, the
  version of the ``edgetok`` domain (null when no edgetok node is left).
- ``target`` str, one of edgetok.export.TARGETS (portable, trt, trt-override, inlined).
- ``edgetok_ops`` list of {``name``, ``op_type``, ``attributes``} for each
  edgetok node in graph order; ``function_bodies`` list of op types whose
  body is in the file; ``plugin_ops`` list of op types a TensorRT build
  runs as edgetok plugins (the plugin library must be loaded): those without
  a body (target trt), or every op with a plugin (target trt-override, which
  TensorRT >= 10.15 resolves to the plugin). DiffDrop has no plugin and keeps
  its body in every target.
- ``input`` {``name``, ``shape``, ``dtype``}: shape is a list whose dynamic
  batch axis is the string ``"batch"`` (an int when exported with a fixed
  batch); dtype a numpy dtype name (``float32``).
- ``inputs`` list of every graph input, same conventions (``input`` is the
  first; models of edgetok/export/families.py, e.g. a T5 encoder's
  input_ids + attention_mask, have several).
- ``outputs`` list of {``name``, ``shape``, ``dtype``}, same conventions
  (other dynamic axes are named strings).
- ``tokens`` list of int: tokens entering each block, then after the last.
- ``flops`` {``total``, ``baseline``, ``ratio``, ``layers``}: FLOPs at batch 1
  (multiply-add = 2), of the reduced and the unreduced model, and
  baseline/total (the ideal speed-up); ``layers`` as edgetok.flops reports them.
- ``preprocessing`` {``mean``, ``std``, ``size`` [H, W], ``resize`` (shorter
  side before the crop, or null), ``interpolation``, ``source``} or null when
  unknown; ``source`` says where the numbers come from (timm pretrained_cfg,
  HF image processor defaults, torchvision weights transforms).
- ``schedule`` how the per-layer values in ``params`` were chosen: null for an
  unreduced model; {``source``: ``"given"``} when they were given; for
  ``--schedule auto`` (edgetok.tune.auto) {``source``: ``"auto"``,
  ``method``, ``r``, ``goal`` ({``min_speedup``} or {``budget_ms``}),
  ``backend``, ``batch``, ``predicted_speedup``, ``predicted_ms``,
  ``baseline_ms``, ``fidelity``, ``goal_met``, ``reduced`` (false: nothing
  paid off, r=0), ``reason``, ``cost_table`` (the cost table's cache key:
  model shape, backend, batch, machine, method)}.
- ``stream`` null, or for a streaming step whose graph has a second, state
  input (``--method dtd``: edgetok/export/dtd.py) {``kind`` ("dtd"),
  ``threshold``, ``protect_first``, ``state_input`` {``name``, ``shape``,
  ``dtype``} (the previous frame's tokens), ``state_output`` (the output
  to feed back as the next frame's ``state_input``), ``first_state``
  ("zeros": what to feed on the first frame), ``tokens``/``idx``/``count``
  (names of the kept tokens, their positions with -1 padding, and the count
  per stream)}. ``input`` is then the pixel input only.
- ``batch_profile`` {``min``, ``opt``, ``max``} from the export config, or null.
- ``config`` str, the export config name, or null.
- ``parity`` {``batches``, ``max_abs_err``, ``tolerance``}: the ONNX Runtime
  CPU check against the torch model (``max_abs_err`` per batch, as strings of
  the batch size), or null when it was skipped or impossible (trt target).
- ``sha256`` str, of model.onnx.
- ``versions`` {``torch``, ``onnx``, ``onnxruntime``, ``onnxscript``, ``edgetok``}.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_VERSION = 1

FIELDS = (
    "manifest_version", "model", "family", "method", "params", "adaptive", "opset", "edgetok_opset", "target",
    "edgetok_ops", "function_bodies", "plugin_ops", "input", "inputs", "outputs", "tokens", "flops", "preprocessing", "schedule", "stream",
    "batch_profile",
    "config", "parity", "sha256", "versions",
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    from .._version import __version__

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
        "edgetok": __version__,
    }


def dumps(manifest: dict) -> str:
    missing = [f for f in FIELDS if f not in manifest]
    if missing:
        raise ValueError(f"manifest is missing {missing}")
    return json.dumps({f: manifest[f] for f in FIELDS}, indent=2) + "\n"


def load(path) -> dict:
    """Read a manifest.json (or the one in an export directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    return json.loads(p.read_text())
