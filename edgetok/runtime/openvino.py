"""OpenVINO as a runtime backend (``--backend openvino``), issue 22.

Why OpenVINO: on an Intel CPU it is the runtime a deployer would pick, and on
this repository's CPU machine it runs the same ViT 8-25 % faster than ONNX
Runtime (issue 22's table; benchmarks/bench_openvino.py re-measures it).

Two things make edgetok's exports need care here:

- OpenVINO's ONNX frontend does not use ONNX model-local functions of a custom
  domain: a portable export fails with "No conversion rule found for
  operations: edgetok.TokenMerge". ``openvino_model`` therefore inlines the
  ``edgetok`` function bodies (``onnx.inliner.inline_local_functions``, the
  same rewrite as the ``inlined`` export target in edgetok/export/targets.py,
  which this layer may not import) before OpenVINO reads the graph. A ``trt``
  export has no bodies to inline and is refused with the fix.
- OpenVINO's CPU plugin runs float32 graphs in bfloat16 on CPUs with AMX or
  AVX512-BF16 unless told otherwise (measured here: outputs 0.02-0.05 off
  float32). edgetok never changes precision silently, so every compiled model
  sets ``INFERENCE_PRECISION_HINT`` explicitly: f32 for the ``openvino``
  backend, bf16 only for the ``openvino-bf16`` backend, whose name is what
  reports record (edgetok/validate/report.py writes the runner's backend).
  The precision OpenVINO actually compiled is read back and checked.

openvino is an optional extra (pip install 'edgetok[openvino]'), imported on use.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import InputShapeError
from .artifacts import Artifacts
from .backends import Backend, BackendError, Runner

INSTALL = "openvino is not installed: pip install 'edgetok[openvino]'"
DOMAIN = "edgetok"  # the custom op domain (edgetok/export/targets.py DOMAIN)
# edgetok's precision names -> OpenVINO's INFERENCE_PRECISION_HINT values
OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def openvino_missing() -> Optional[str]:
    """The one-line reason OpenVINO cannot be used here, or None."""
    return INSTALL if importlib.util.find_spec("openvino") is None else None


def inline_edgetok(proto):
    """``proto`` with every local function inlined and the edgetok opset import dropped: a
    standard-op graph OpenVINO's ONNX frontend converts (it ignores function bodies)."""
    import onnx.inliner

    if not proto.functions:
        return proto
    inlined = onnx.inliner.inline_local_functions(proto)
    imports = [o for o in inlined.opset_import if o.domain != DOMAIN]
    del inlined.opset_import[:]
    inlined.opset_import.extend(imports)
    return inlined


def _load(path):
    import onnx

    try:
        return onnx.load(str(path))  # with any external data: the inlined graph is handed over whole
    except Exception as e:  # protobuf decode errors share no base class with OSError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BackendError(f"{path} is not a readable ONNX model ({first}); re-export it") from None


def _read(core, model: Union[str, Path, "object"]):
    """An ov.Model from an ONNX path or ModelProto, local functions inlined first."""
    where = model if isinstance(model, (str, Path)) else "the model"
    proto = _load(model) if isinstance(model, (str, Path)) else model
    try:
        if isinstance(model, (str, Path)) and not proto.functions:
            return core.read_model(str(model))  # as written: external data stays where it is
        return core.read_model(inline_edgetok(proto).SerializeToString())
    except Exception as e:  # OpenVINO raises RuntimeError / OpConversionFailure with multi-line text
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        rule = next((ln for ln in lines if "No conversion rule" in ln), lines[0] if lines else type(e).__name__)
        raise BackendError(f"OpenVINO cannot read {where}: {rule[:300]}; export it with --target portable "
                           "(standard-op bodies) or inlined") from None


def compile_openvino(model, precision: str = "fp32", threads: Optional[int] = None):
    """An OpenVINO CompiledModel on the CPU for ``model`` (an ONNX path or ModelProto) with the
    inference precision set explicitly (``precision``: fp32 or bf16) and checked after compiling."""
    if precision not in OV_PRECISIONS:
        raise BackendError(f"unknown OpenVINO precision {precision!r}; choose one of {', '.join(OV_PRECISIONS)}")
    if openvino_missing():
        raise BackendError(INSTALL)
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    read = _read(core, model)
    try:
        compiled = core.compile_model(read, "CPU", config)
    except Exception as e:  # one line of OpenVINO's multi-line report, naming the step that failed
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise BackendError(f"OpenVINO cannot compile the model for the CPU: {first[:300]}; run it with "
                           "--backend ort-cpu, and report the export to edgetok") from None
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    if got.to_string() != OV_PRECISIONS[precision]:
        raise BackendError(f"OpenVINO compiled the model in {got.to_string()}, not the {precision} asked for; this CPU "
                           "may lack the instructions for it: use --backend openvino (float32)")
    return compiled


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin has bfloat16 kernels here (AVX512-BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _name(port, graph_names: set) -> str:
    """The graph's name for a compiled model's port (a port can carry several tensor names)."""
    names = port.get_names()
    return next((n for n in sorted(names) if n in graph_names), port.get_any_name())


class OpenVinoRunner(Runner):
    """One CompiledModel and one InferRequest; outputs by their ONNX names."""

    def __init__(self, art: Artifacts, precision: str, backend: str, threads: Optional[int] = None):
        self.compiled = compile_openvino(art.onnx, precision, threads)
        self.request = self.compiled.create_infer_request()
        self.input, self.precision, self.backend = art.inputs()[0], precision, backend
        self.inputs = [_name(p, {t.name for t in art.inputs()}) for p in self.compiled.inputs]
        # a port may carry several tensor names (an output that is also an inner tensor): use the graph's
        self.output_names = [o.name for o in art.outputs()]
        self.ports = [self.compiled.output(name) for name in self.output_names]

    def infer(self, x, **state):
        self.check(x)
        if set(state) != set(self.inputs) - {self.input.name}:
            raise InputShapeError(f"the model takes inputs {self.inputs}; got {[self.input.name, *state]}: pass "
                                  "the others by name, infer(x, NAME=array)")
        feeds = {self.input.name: np.ascontiguousarray(x, dtype=np.float32)}
        feeds |= {k: np.ascontiguousarray(v) for k, v in state.items()}
        res = self.request.infer(feeds)  # copies the outputs (share_outputs=False)
        return {name: res[port] for name, port in zip(self.output_names, self.ports)}


class OpenVino(Backend):
    """``openvino`` (float32) and ``openvino-bf16`` (bfloat16 on request) on the CPU."""

    def __init__(self, precision: str = "fp32"):
        self.precision = precision
        self.name = "openvino" if precision == "fp32" else f"openvino-{precision}"

    def unavailable(self, art: Optional[Artifacts] = None) -> Optional[str]:
        missing = openvino_missing()
        if missing:
            return missing
        if self.precision == "bf16" and not cpu_has_bf16():
            return "this CPU has no bfloat16 kernels in OpenVINO (no AVX512-BF16/AMX); use --backend openvino"
        if art is not None and art.onnx is None:
            return f"{art.root} has no ONNX model"
        m = art.manifest if art is not None else None
        if m is not None and m.plugin_ops and set(m.plugin_ops) - set(m.function_bodies):
            return (f"{art.onnx} is a '{m.target}' export: its {', '.join(m.plugin_ops)} nodes have no standard-op "
                    "body for OpenVINO to run; re-export with --target portable or --config openvino-cpu")
        return None

    def open(self, art: Artifacts, threads: Optional[int] = None, **_) -> Runner:
        return OpenVinoRunner(art, self.precision, self.name, threads)


OPENVINO_BACKENDS = (OpenVino("fp32"), OpenVino("bf16"))
