"""Build-time stand-ins for the edgetok TensorRT plugins, written in Python, and the
loader fix that TensorRT-RTX's pip wheels need before any plugin (C++ or Python) can be
added by its ONNX parser.

What the stand-ins are for: parsing and building, with TensorRT-RTX and no GPU, a graph
that keeps the edgetok nodes (the ``trt`` target's form, function bodies stripped). That
checks the parser's node -> plugin mapping (op type, ``plugin_version``,
``plugin_namespace``, attribute names and types), that the output shapes and types the
plugins declare (ThresholdMerge's data-dependent row count as a size tensor included) fit
the rest of the graph, and that TensorRT finds a format combination. Each stand-in copies
the build-time side of its C++ plugin in plugins/trt/plugins.cpp: the fields,
getNbOutputs, getOutputDataTypes, getOutputShapes and supportsFormatCombination
(tests/test_plugin_mapping.py holds the two against each other). They have no kernels.

Their engines are for checking only, never for running. A stand-in reports plugin
version ``BUILD_CHECK_VERSION`` ("1-buildcheck"), and that is the version the engine
records (the node and the creator use "1", so parsing is unchanged). No creator is
registered under that version anywhere, so no runtime can rebuild those layers from the
real C++ library (deserialization finds no creator; not run here, there was no GPU).
Without that, a runtime would run the C++ plugin with a workspace the stand-in never sized
(the stand-ins report 0 bytes; the C++ plugin asks for more and writes it). To get an engine you can deploy, register the C++ library
(libedgetok_trt_plugins.so, compiled against TensorRT-RTX's headers) at build time and at
run time, after the loader fix below.

The loader fix the wheels need before any plugin layer can be added lives in
edgetok/runtime/rtx_loader.py (it is needed to import TensorRT-RTX at all safely).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import EdgetokError
from ..runtime.env import RTX_MODULE as _RTX_MODULE
from ..runtime.rtx_loader import PluginLoaderError, loader_problem, prepare_loader

NAMESPACE = "edgetok"  # = plugins.cpp kNamespace = edgetok.ops.onnx.PLUGIN_ATTRS["plugin_namespace"]
VERSION = "1"  # = plugins.cpp kVersion = PLUGIN_ATTRS["plugin_version"]: what the parser looks up
BUILD_CHECK_VERSION = "1-buildcheck"  # what a stand-in records in the engine (see the module doc)



class BuildCheckError(EdgetokError, RuntimeError):
    """A graph with edgetok nodes did not parse or build with the stand-ins."""


# --------------------------------------------------------------------------------------
# What each plugin declares at build time (mirrors plugins/trt/plugins.cpp)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "int32" (ONNX INT, PluginFieldType kINT32) or "float32" (ONNX FLOAT, kFLOAT32)
    default: float  # the C++ member's initial value, used when the node lacks the attribute


@dataclass(frozen=True)
class PluginSpec:
    name: str  # = ONNX op type = C++ plugin name
    fields: tuple[Field, ...]
    input_ranks: tuple[int, ...]
    outputs: tuple[str, ...]  # each output's type: "x" (the type of input 0), "int64" or "int32"
    shapes: Callable  # (trt, expr_builder, input DimsExprs, field values) -> list of output DimsExprs


def _dims(trt, *exprs):
    d = trt.DimsExprs(len(exprs))
    for i, e in enumerate(exprs):
        d[i] = e
    return d


def _merge_shapes(trt, eb, inp, v):  # TokenMergePlugin::getOutputShapes
    x = inp[0]
    rows = eb.operation(trt.DimensionOperation.SUB, x[1], eb.constant(int(v["r"])))
    return [_dims(trt, x[0], rows, x[2]), _dims(trt, x[0], rows, eb.constant(1))]


def _drop_shapes(trt, eb, inp, v):  # TokenDropPlugin::getOutputShapes
    x, keep = inp[0], int(v["keep"])
    fused = keep + (1 if int(v["fuse_dropped"]) else 0)
    return [_dims(trt, x[0], eb.constant(fused), x[2]), _dims(trt, x[0], eb.constant(keep))]


def _threshold_shapes(trt, eb, inp, v):  # ThresholdMergePlugin::getOutputShapes
    x = inp[0]
    n = x[1]
    op = trt.DimensionOperation
    opt = eb.operation(op.FLOOR_DIV, eb.operation(op.PROD, n, eb.constant(3)), eb.constant(4))
    m = eb.declare_size_tensor(3, opt, n)  # output 3: the 0-D INT32 row count, upper bound N
    return [_dims(trt, x[0], m, x[2]), _dims(trt, x[0], m, eb.constant(1)), _dims(trt, x[0]), _dims(trt)]


SPECS: dict[str, PluginSpec] = {
    s.name: s
    for s in (
        PluginSpec("TokenMerge", (Field("r", "int32", 0), Field("protect_first", "int32", 1)),
                   (3, 3, 3), ("x", "x"), _merge_shapes),
        PluginSpec("TokenDrop",
                   (Field("keep", "int32", 1), Field("protect_first", "int32", 1), Field("fuse_dropped", "int32", 0)),
                   (3, 2), ("x", "int64"), _drop_shapes),
        PluginSpec("ThresholdMerge", (Field("threshold", "float32", 0.9), Field("protect_first", "int32", 1)),
                   (3, 3, 3), ("x", "x", "int64", "int32"), _threshold_shapes),
    )
}

# --------------------------------------------------------------------------------------
# The stand-ins
# --------------------------------------------------------------------------------------

_CLASSES: dict[int, tuple[type, type]] = {}
_LIVE: list = []  # registrations (and through them every plugin object TensorRT holds) stay alive


class _StandInPlugin:
    """Build-time side of one edgetok plugin; records version BUILD_CHECK_VERSION; no kernels.
    Mixed into the TensorRT module's plugin interfaces by ``_classes`` (TensorRT is imported late)."""

    trt = None  # the TensorRT module, set on the subclass

    def __init__(self, spec: PluginSpec, values: dict, keep: list):
        for base in (self.trt.IPluginV3, self.trt.IPluginV3OneCore, self.trt.IPluginV3OneBuild,
                     self.trt.IPluginV3OneRuntime):
            base.__init__(self)
        self.plugin_name = spec.name
        self.plugin_namespace = NAMESPACE
        self.plugin_version = BUILD_CHECK_VERSION
        self.num_outputs = len(spec.outputs)
        self.timing_cache_id = ""
        self.spec, self.values, self._keep = spec, dict(values), keep
        keep.append(self)  # TensorRT holds only the C++ side: the Python object must outlive it

    def get_capability_interface(self, type):
        return self

    def clone(self):
        return type(self)(self.spec, self.values, self._keep)

    def get_fields_to_serialize(self):
        import numpy as np

        np_type = {"int32": np.int32, "float32": np.float32}
        return self.trt.PluginFieldCollection([
            self.trt.PluginField(f.name, np.array([self.values[f.name]], dtype=np_type[f.kind]),
                                 _field_type(self.trt, f.kind))
            for f in self.spec.fields
        ])

    def configure_plugin(self, inputs, outputs):
        return None

    def on_shape_change(self, inputs, outputs):
        return None

    def get_output_data_types(self, input_types):
        return [input_types[0] if t == "x" else _out_type(self.trt, t) for t in self.spec.outputs]

    def get_output_shapes(self, inputs, shape_inputs, expr_builder):
        ranks = tuple(len(d) for d in inputs)
        if ranks != self.spec.input_ranks:
            raise ValueError(f"{self.spec.name}: inputs of ranks {ranks}, expected {self.spec.input_ranks}")
        return self.spec.shapes(self.trt, expr_builder, inputs, self.values)

    def supports_format_combination(self, pos, in_out, num_inputs):
        trt, desc = self.trt, in_out[pos].desc
        if desc.format != trt.TensorFormat.LINEAR:
            return False
        if pos == 0:
            return desc.type in tuple(getattr(trt.DataType, t) for t in ("FLOAT", "HALF", "BF16")
                                      if hasattr(trt.DataType, t))
        kind = "x" if pos < num_inputs else self.spec.outputs[pos - num_inputs]
        return desc.type == (in_out[0].desc.type if kind == "x" else _out_type(trt, kind))

    def get_workspace_size(self, inputs, outputs):
        return 0  # never sized: the engine records BUILD_CHECK_VERSION so it cannot run

    def get_valid_tactics(self):
        return []

    def set_tactic(self, tactic):
        return None

    def attach_to_context(self, context):
        return self.clone()

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
        raise RuntimeError(f"{self.spec.name}: edgetok's Python plugins are build-time stand-ins without "
                           "kernels; run engines built with the C++ plugin library")


class _StandInCreator:
    trt = None
    plugin_class = None  # the _StandInPlugin subclass of the same TensorRT module

    def __init__(self, spec: PluginSpec):
        import numpy as np

        self.trt.IPluginCreatorV3One.__init__(self)
        self.name = spec.name
        self.plugin_namespace = NAMESPACE
        self.plugin_version = VERSION
        self.field_names = self.trt.PluginFieldCollection(
            [self.trt.PluginField(f.name, np.array([]), _field_type(self.trt, f.kind)) for f in spec.fields])
        self.spec = spec
        self.plugins: list = []

    def create_plugin(self, name, fc, phase):
        if phase == self.trt.TensorRTPhase.RUNTIME:
            raise RuntimeError(f"{self.spec.name}: edgetok's Python plugins are build-time stand-ins; load the "
                               "C++ plugin library (libedgetok_trt_plugins.so) to run an engine")
        values = {f.name: f.default for f in self.spec.fields}
        kinds = {f.name: f.kind for f in self.spec.fields}
        for f in fc:  # unknown fields are ignored, as plugins.cpp's readFields does
            if f.name not in kinds:
                continue
            if f.type != _field_type(self.trt, kinds[f.name]) or len(f.data) < 1:
                raise TypeError(f"{self.spec.name}: attribute '{f.name}' must be one {kinds[f.name].upper()}")
            values[f.name] = float(f.data[0]) if kinds[f.name] == "float32" else int(f.data[0])
        return self.plugin_class(self.spec, values, self.plugins)


def _field_type(trt, kind: str):
    return {"int32": trt.PluginFieldType.INT32, "float32": trt.PluginFieldType.FLOAT32}[kind]


def _out_type(trt, kind: str):
    return {"int64": trt.DataType.INT64, "int32": trt.DataType.INT32}[kind]


def _classes(trt):
    """The stand-in plugin and creator classes for the TensorRT module ``trt`` (made once per module)."""
    if id(trt) not in _CLASSES:
        plugin = type("StandInPlugin", (_StandInPlugin, trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                                        trt.IPluginV3OneRuntime), {"trt": trt})
        creator = type("StandInCreator", (_StandInCreator, trt.IPluginCreatorV3One),
                       {"trt": trt, "plugin_class": plugin})
        _CLASSES[id(trt)] = (plugin, creator)
    return _CLASSES[id(trt)]


def _tensorrt(trt=None):
    """``trt``, or TensorRT-RTX imported after prepare_loader()."""
    if trt is not None:
        return trt
    if _RTX_MODULE not in sys.modules:
        prepare_loader()
    from ..runtime.env import import_tensorrt_rtx

    return import_tensorrt_rtx()


class Registration:
    """The stand-in creators registered in one plugin registry; ``unregister()`` (or leaving a
    ``with`` block) removes them. Until then they, and every plugin object made, stay alive."""

    def __init__(self, registry, creators: list):
        self.registry, self.creators = registry, creators

    def unregister(self) -> None:
        for c in self.creators:
            self.registry.deregister_creator(c)
        self.creators = []
        if self in _LIVE:
            _LIVE.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unregister()


def register(trt=None, registry=None) -> Registration:
    """Register the stand-ins for TokenMerge, TokenDrop and ThresholdMerge (namespace "edgetok",
    version "1") in ``registry`` (default: ``trt``'s global plugin registry). ``trt`` defaults to
    TensorRT-RTX, imported after ``prepare_loader()``. Raises PluginLoaderError when TensorRT-RTX's
    parser would abort on a plugin node, or when edgetok plugins are registered already (the C++
    library: then no stand-ins are needed)."""
    trt = _tensorrt(trt)
    if trt.__name__.split(".")[0] == _RTX_MODULE:
        problem = loader_problem()
        if problem is not None:
            raise PluginLoaderError(problem)
    registry = registry or trt.get_plugin_registry()
    taken = [n for n in SPECS if registry.get_creator(n, VERSION, NAMESPACE) is not None]
    if taken:
        raise PluginLoaderError(f"edgetok plugins are already registered ({', '.join(taken)}; the C++ plugin "
                                "library?); the build-time stand-ins are not needed")
    _, creator_cls = _classes(trt)
    creators = []
    for spec in SPECS.values():
        c = creator_cls(spec)
        if not registry.register_creator(c, NAMESPACE):
            for done in creators:
                registry.deregister_creator(done)
            raise PluginLoaderError(f"TensorRT refused to register the {spec.name} stand-in")
        creators.append(c)
    reg = Registration(registry, creators)
    _LIVE.append(reg)
    return reg


def check_build(model, shapes: Optional[dict] = None, trt=None, keep_engine: bool = False) -> dict:
    """Parse and build ``model`` (ONNX bytes, a path or a ModelProto) with the stand-ins; -> a report
    {"plugin_layers": [{"name", "outputs": [(name, shape, dtype)]}], "layers": n, "engine_bytes": n}
    (plus "engine": the serialized engine with ``keep_engine``; it records BUILD_CHECK_VERSION and
    cannot run). ``shapes``: {input name: (min, opt, max)} for inputs with dynamic dimensions.
    Raises BuildCheckError."""
    trt = _tensorrt(trt)
    with register(trt):
        data = model.SerializeToString() if hasattr(model, "SerializeToString") else (
            model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes())
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(data):
            raise BuildCheckError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
        config = builder.create_builder_config()  # TensorRT-RTX is strongly typed: fp16 = an fp16-typed graph
        dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
        if dynamic:
            missing = [t.name for t in dynamic if t.name not in (shapes or {})]
            if missing:
                raise BuildCheckError(f"inputs with dynamic dimensions need shapes=(min, opt, max): {missing}")
            profile = builder.create_optimization_profile()
            for t in dynamic:
                profile.set_shape(t.name, *shapes[t.name])
            config.add_optimization_profile(profile)
        plugin_layers = []
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.PLUGIN_V3:
                outs = [layer.get_output(j) for j in range(layer.num_outputs)]
                plugin_layers.append({"name": layer.name,
                                      "outputs": [(t.name, tuple(t.shape), str(t.dtype).rsplit(".", 1)[-1])
                                                  for t in outs]})
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise BuildCheckError("the builder returned no engine (see TensorRT's log)")
        report = {"plugin_layers": plugin_layers, "layers": network.num_layers, "engine_bytes": blob.nbytes}
        if keep_engine:
            report["engine"] = bytes(blob)
        return report
