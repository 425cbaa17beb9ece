"""Precision of an export: fp32 as traced, a typed fp16 graph, or an int8 Q/DQ graph.

``apply_precision(model, precision, calibration)`` rewrites the full-form ModelProto
(edgetok nodes + their function bodies, before edgetok/export/targets.py rewrites it
for a target) and returns it with a record for the export manifest: what was done,
what stayed float32, and the parity against the float32 graph, measured here in
ONNX Runtime CPU (edgetok.runtime.backends.ort_session). docs/precision.md has the
measurements behind every choice below.

fp16 (``to_fp16``): float32 inputs and outputs, float16 inside (a Cast after each
float input and before each float output, so the runtime, the preprocessing and the
manifests keep float32). Initializers and float constants become float16 (finite
values beyond float16's range saturate instead of becoming infinities, which would
turn ``0 * inf`` into NaN), ``Cast(to=float)`` becomes ``Cast(to=float16)``.
Float32 islands:

- every ``edgetok`` node: its float inputs are cast to float32 and its float outputs
  back to float16, and its function body is left as it is, so the op runs entirely in
  float32 -- the cosine scores, the -inf/+inf masks, the TopK keys, the size sums --
  and is exact given its (float16-rounded) inputs. An edgetok output read by another
  edgetok node or by a graph output is passed on in float32 without the round trip;
- the op types in ``keep_fp32`` (default: none; ``FP32_CANDIDATES`` are the ones it
  makes sense for). LayerNormalization keeps its statistics in float32 in any case
  (its ``stash_type`` is 1, float32, by default in ONNX).

int8 (``quantize_int8``): ONNX Runtime static quantization (``quantize_static``, QDQ
format, MinMax calibration on the user's images through a CalibrationDataReader) of
the linear layers only: MatMul whose B is a constant, Gemm and Conv, per-channel
weights. Attention's activation-by-activation MatMuls, the softmax, LayerNorm and the
edgetok nodes stay float32. ORT's quantizer keeps the model-local functions as they
are (it quantizes the main graph only), but it rewires *every* consumer of a tensor it
quantizes to the DequantizeLinear output; an edgetok node reading such a tensor is set
back to the float tensor here, so the reduction ops always see float values. The
scheme decides the integer types: ``s8s8`` (default: int8 activations and weights,
symmetric, zero points 0, the form TensorRT's explicit quantization consumes) or
``u8s8`` (uint8 asymmetric activations, 7-bit weights: ORT's advice for x86 CPUs
without VNNI; ONNX Runtime only).

``check_precision(precision, target, calibration)`` refuses what cannot work;
``calibration_batches(source, preprocessing, input_shape)`` turns a folder of images
or an .npz into preprocessed float32 NCHW batches (edgetok.runtime.preprocess, the
preprocessing the runtime applies).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ..errors import EdgetokError

PRECISIONS = ("fp32", "fp16", "int8")
METADATA_KEY = "edgetok.precision"  # model.metadata_props: the precision a graph was written in
DOMAIN = "edgetok"
FLOAT, FLOAT16, BFLOAT16 = 1, 10, 16  # onnx.TensorProto element types
DTYPES = {"float16": FLOAT16, "bfloat16": BFLOAT16}
# op types that may be kept float32 in an fp16 graph (keep_fp32); all their float inputs and outputs are one type
FP32_CANDIDATES = ("Softmax", "LayerNormalization", "ReduceMean", "ReduceSum", "Exp", "Log", "Pow", "Sqrt", "Div")
# inputs that ONNX types as float32 whatever the data type (Resize's scales, Upsample's scales)
FLOAT32_ONLY_INPUTS = {"Resize": {2}, "Upsample": {1}}
FP16_TOLERANCE = {"max_rel_err": 1e-2, "cosine_min": 0.999}  # max |fp16 - fp32| / max |fp32| over each output
INT8_TOLERANCE = {"cosine_min": 0.95}  # per sample; real images, held out of the calibration
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
SCHEMES = {
    # TensorRT's explicit quantization needs int8 with zero point 0 (symmetric); ORT CPU runs it too
    "s8s8": {"activation": "int8", "weight": "int8", "activation_symmetric": True, "reduce_range": False},
    # onnxruntime.quantization.quantize_static's advice for x86 without VNNI; not consumable by TensorRT
    "u8s8": {"activation": "uint8", "weight": "int8", "activation_symmetric": False, "reduce_range": True},
}
FEATURES_OUTPUT = "features"  # the exporter's parity output beside the model's (edgetok/export/exporter.py)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class PrecisionError(EdgetokError, ValueError):
    """A precision cannot be applied to this model, for this target, or with these inputs."""


# -- what a target can run -------------------------------------------------------------------
_BACKEND_ALIASES = {"ort-cpu": "ort-cpu", "onnxruntime-cpu": "ort-cpu", "cpu": "ort-cpu",
                    "ort-cuda": "ort-cuda", "onnxruntime-cuda": "ort-cuda",
                    "trt": "tensorrt", "tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt-rtx", "rtx": "tensorrt-rtx"}

# measured on this repository's CPU machine (docs/precision.md): ORT CPU has float16 kernels for few ops and
# inserts float32 casts around the others, so an fp16 graph is no faster there
FP16_ORT_CPU = ("ONNX Runtime's CPU provider has float16 kernels for few ops and runs the rest through inserted "
                "float32 casts: measured no faster than fp32 (docs/precision.md)")
INT8_ORT_CUDA = ("ONNX Runtime's CUDA provider has no int8 kernels for Q/DQ MatMul/Conv: it would dequantize and "
                 "run them in float")


def _runtime_of(target) -> tuple[Optional[str], str]:
    """(runtime kind: ort-cpu, ort-cuda, tensorrt, tensorrt-rtx or None, a name for messages)."""
    if target is None:
        return None, "no target"
    if hasattr(target, "runtime"):  # edgetok.config.ExportConfig
        if target.runtime == "onnxruntime":
            return ("ort-cuda" if target.device == "cuda" else "ort-cpu"), f"config {target.name!r}"
        return target.runtime, f"config {target.name!r}"
    name = str(target)
    if name in _BACKEND_ALIASES:
        return _BACKEND_ALIASES[name], name
    from ..config import load_config

    return _runtime_of(load_config(name))


# TensorRT-RTX 1.7 has no float32 GEMM kernel for Turing (SM75): "Cannot compile operation ... for
# Turing (SM75): FP32 GEMM is not supported" (measured here with its builder, tests/test_precision.py)
NO_FP32_GEMM = {"tensorrt-rtx": {75}}


def fp32_gemm(config) -> bool:
    """Whether every GPU ``config`` (an ExportConfig, or None) builds for has float32 GEMM kernels,
    so the float32 islands of an fp16 graph (the edgetok ops) and an int8 graph's float32 MatMuls build."""
    if not hasattr(config, "runtime"):
        return True
    return not set(config.compute_capabilities or ()) & NO_FP32_GEMM.get(config.runtime, set())


def _config_of(target):
    """The ExportConfig ``target`` names (None for a backend name or None)."""
    if target is None or hasattr(target, "runtime") or str(target) in _BACKEND_ALIASES:
        return target if hasattr(target, "runtime") else None
    from ..config import load_config

    return load_config(str(target))


def check_precision(precision: str, target=None, calibration=None) -> str:
    """The precision asked for, checked against ``target`` (an ExportConfig, a config name, a backend
    name: ort-cpu, ort-cuda, trt/tensorrt, tensorrt-rtx; or None) and the calibration given; raises
    PrecisionError naming the problem and the fix. -> the precision (one of PRECISIONS)."""
    if precision in ("bf16", "bfloat16"):
        raise PrecisionError("precision bf16 is not offered (ONNX Runtime CPU has almost no bfloat16 kernels and "
                             "no edgetok config asks for it); use --precision fp16")
    if precision == "best":
        raise PrecisionError("precision 'best' is a TensorRT builder flag (per-layer choice, int8 with placeholder "
                             "scales), not a graph precision; export with --precision fp16, or int8 with --calibration")
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    config = _config_of(target)  # a config name is read once
    runtime, where = _runtime_of(config or target)
    if precision == "fp16" and runtime == "ort-cpu":
        raise PrecisionError(f"precision fp16 is refused for {where} (ONNX Runtime CPU): {FP16_ORT_CPU}; "
                             "use --precision fp32, or int8 with --calibration DIR")
    if precision == "int8":
        if runtime == "ort-cuda":
            raise PrecisionError(f"precision int8 is refused for {where}: {INT8_ORT_CUDA}; use --precision fp16 "
                                 "there, or a TensorRT config (rtx, t4, ...) for int8")
        if not fp32_gemm(config):
            raise PrecisionError(f"precision int8 is refused for {where}: its int8 graph keeps attention's "
                                 "activation MatMuls in float32, and TensorRT-RTX has no float32 GEMM for Turing "
                                 "(SM75); use a config without 75 in compute_capabilities, or fp16")
        if calibration is None or (not isinstance(calibration, (str, Path)) and len(calibration) == 0):
            raise PrecisionError("precision int8 needs calibration images: pass --calibration DIR (a folder of "
                                 "images, or an .npz of uint8 images) with a few hundred images like the ones "
                                 "the model will see")
    return precision


def export_precision(precision: Optional[str], config=None, calibration=None) -> tuple[str, Optional[str]]:
    """(the precision an export writes its graph in, a note) from ``--precision`` and the config's.

    An ONNX Runtime config's precision is the graph's (ONNX Runtime runs the graph as written). A
    TensorRT config's fp16 (or best) is applied by ``edgetok build``, which casts the float32 graph with
    the same transform (to_fp16), so its export stays float32 unless ``--precision fp16`` asks; its
    int8 is the export's, since TensorRT reads int8 scales from Q/DQ nodes. ``--precision`` and the
    config must agree where both speak."""
    if config is None:
        return check_precision(precision or "fp32", None, calibration), None
    trt = config.runtime.startswith("tensorrt")
    engine = config.precision
    carried = engine if (not trt or engine == "int8") else "fp32"
    if precision is not None and precision not in (engine, carried):
        check_precision(precision, config, calibration)  # what the runtime cannot do at all, named first
        raise PrecisionError(f"--precision {precision} disagrees with config {config.name!r}, whose precision is "
                             f"{engine}; drop --precision, or use a config with precision {precision} (a copy of "
                             f"{config.name}.yaml with precision: {precision})")
    chosen = check_precision(precision or carried, config, calibration)
    note = (f"float32 graph; edgetok build casts it to {'float16' if engine == 'best' else engine} for config "
            f"{config.name!r} (edgetok/trt/cast.py)") if trt and chosen == "fp32" and engine != "fp32" else None
    return chosen, note


# -- calibration images -------------------------------------------------------------------------
def _load_npz(path: Path) -> np.ndarray:
    with np.load(path) as d:
        keys = [k for k in d.files if d[k].ndim == 4]
        key = "images" if "images" in d.files else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise PrecisionError(f"{path}: no image array; store the images as 'images' (uint8 [N,H,W,C] or "
                                 f"[N,C,H,W]), found {', '.join(f'{k} {d[k].shape}' for k in d.files) or 'nothing'}")
        return d[key]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_image(path: Path, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB" if channels == 3 else "L"))
            return arr if arr.ndim == 3 else arr[..., None]
    except (UnidentifiedImageError, OSError) as e:
        raise PrecisionError(f"cannot read calibration image {path}: {e}; remove it or convert it to PNG/JPEG") from None


def _preprocessor(preprocessing, shape: list):
    """edgetok.runtime.preprocess.Preprocessor for the manifest's ``preprocessing`` (a PreprocessSpec, its
    dict, or None: resize to the input size and scale 8-bit images to [0, 1] only)."""
    from ..runtime.preprocess import Preprocessor, PreprocessSpec

    if isinstance(preprocessing, dict):
        preprocessing = PreprocessSpec(**preprocessing)
    return Preprocessor(preprocessing, shape)


def calibration_batches(source, preprocessing, input_shape: Sequence, batch: int = 8,
                        limit: Optional[int] = None) -> list[np.ndarray]:
    """Calibration images as preprocessed float32 NCHW batches of ``batch`` (the last may be smaller).

    ``source``: a folder (every .jpg/.jpeg/.png/.bmp/.webp/.tif below it, in sorted path order), an .npz
    (array ``images``, or its one 4-D array: uint8 [N,H,W,C] or [N,C,H,W]) or such an array. 8-bit
    images get the model's preprocessing (``preprocessing``: the manifest's field; the runtime's
    edgetok.runtime.preprocess.Preprocessor, so calibration sees what the deployed model sees); a float
    array is taken as already preprocessed and must have the input's shape [N,C,H,W]. ``input_shape``:
    the graph input's shape (its batch entry is ignored). ``limit``: the first ``limit`` images only."""
    shape = list(input_shape)
    if len(shape) != 4:
        raise PrecisionError(f"calibration images need an image input [N,C,H,W]; this model's input is {shape}")
    pre = _preprocessor(preprocessing, shape)
    files: list[Path] = []
    if isinstance(source, np.ndarray):
        images, what = source, "the array"
    else:
        path = Path(source)
        if not path.exists():
            raise PrecisionError(f"calibration source {path} does not exist; pass a folder of images or an .npz")
        if path.is_dir():
            files, images, what = _image_files(path), None, str(path)
            if not files:
                raise PrecisionError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of "
                                     "images or an .npz")
        elif path.suffix == ".npz":
            images, what = _load_npz(path), str(path)
        else:
            raise PrecisionError(f"calibration source {path} is neither a folder nor an .npz file")
    count = len(files) if images is None else len(images)
    n = count if limit is None else min(count, int(limit))
    out = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        if images is None:
            chunk = pre([_read_image(f, int(shape[1])) for f in files[start:stop]])
        elif np.issubdtype(images.dtype, np.floating):
            chunk = _float_batch(images[start:stop], shape, what)
        else:
            chunk = pre(images[start:stop])
        out.append(np.ascontiguousarray(chunk, dtype=np.float32))
    if not out:
        raise PrecisionError(f"{what}: no calibration images")
    return out


def _float_batch(raw: np.ndarray, shape: list, what: str) -> np.ndarray:
    want = list(shape[1:])
    if list(raw.shape[1:]) != want:
        raise PrecisionError(f"{what}: float images are taken as preprocessed and must be [N,{','.join(map(str, want))}]"
                             f", got {list(raw.shape)}; store 8-bit (uint8) images to have them preprocessed")
    return raw.astype(np.float32)


# -- graph helpers ---------------------------------------------------------------------------------
def graph_precision(model) -> str:
    """What a graph (ModelProto or path) computes in: the edgetok.precision mark apply_precision writes,
    else "int8" (Q/DQ nodes), "fp16" (float16 initializers) or "fp32"."""
    import onnx

    if not hasattr(model, "graph"):
        model = onnx.load(str(model), load_external_data=False)
    mark = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
    if mark in (*PRECISIONS, "bf16"):
        return mark
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    if any(t.data_type == FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def is_qdq(model) -> bool:
    """True when the graph has Q/DQ nodes (explicit quantization; TensorRT takes its scales from them)."""
    return graph_precision(model) == "int8"


def _mark(model, precision: str) -> None:
    props = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, precision


def _float_types(model) -> dict[str, int]:
    """Tensor name -> element type, from ONNX shape inference of the float32 graph."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a help here, not a requirement: unknown types are treated by op type
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


# -- fp16 ---------------------------------------------------------------------------------------------
def _convert_tensor(t, elem: int):
    """A float32 TensorProto as ``elem`` (float16 saturating at its finite range, or bfloat16)."""
    from onnx import helper, numpy_helper

    if t.data_type != FLOAT:
        return t
    arr = numpy_helper.to_array(t)
    if elem == FLOAT16:
        lim = np.finfo(np.float16).max
        return numpy_helper.from_array(np.where(np.isfinite(arr), np.clip(arr, -lim, lim), arr).astype(np.float16),
                                       t.name)
    return helper.make_tensor(t.name, BFLOAT16, arr.shape, arr.astype(np.float32).ravel().tolist())


def _constant_is_float(node) -> bool:
    for a in node.attribute:
        if a.name == "value":
            return a.t.data_type == FLOAT
        if a.name in ("value_float", "value_floats"):
            return True
    return False


def _literal(node) -> bool:
    return any(a.name == "value" and not a.ref_attr_name and a.t.data_type == FLOAT for a in node.attribute)


def convert_nodes(nodes, elem: int) -> list:
    """Float32 literals, Cast(to=float) and ConstantOfShape fills of a node list as ``elem``; a float
    Constant made from an attribute (inside a function) gets a Cast after it. Subgraphs are converted
    with float I/O. -> the new node list (the given node objects, changed in place, plus inserted Casts)."""
    from onnx import helper

    out = []
    for node in nodes:
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "to" and a.i == FLOAT:
                    a.i = elem
        elif node.op_type == "ConstantOfShape":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(_convert_tensor(a.t, elem))
        elif node.op_type == "Constant" and _literal(node):
            value = next(a for a in node.attribute if a.name == "value")
            value.t.CopyFrom(_convert_tensor(value.t, elem))
        elif node.op_type == "Constant" and _constant_is_float(node):  # value_float(s) or a function attribute
            orig = node.output[0]
            node.output[0] = f"{orig}__f32"
            out.append(node)
            out.append(helper.make_node("Cast", [node.output[0]], [orig], to=elem, name=f"{node.name or orig}__cast"))
            continue
        for a in node.attribute:  # If/Loop/Scan bodies
            if a.g.node:
                _convert_subgraph(a.g, elem)
        out.append(node)
    return out


def _convert_subgraph(graph, elem: int) -> None:
    inits = [_convert_tensor(t, elem) for t in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    nodes = convert_nodes(list(graph.node), elem)
    del graph.value_info[:]
    for v in list(graph.input) + list(graph.output):
        if v.type.tensor_type.elem_type == FLOAT:
            v.type.tensor_type.elem_type = elem
    del graph.node[:]
    graph.node.extend(nodes)


class _Names:
    """Fresh tensor names that collide with none in the graph."""

    def __init__(self, graph):
        self.used = {n for node in graph.node for n in (*node.input, *node.output)}
        self.used |= {v.name for v in (*graph.input, *graph.output)} | {t.name for t in graph.initializer}

    def __call__(self, stem: str) -> str:
        name, i = stem, 0
        while name in self.used:
            i += 1
            name = f"{stem}_{i}"
        self.used.add(name)
        return name


def _island_io(node, types: dict, keep: set) -> Optional[tuple[list[int], list[int]]]:
    """(float input indices, float output indices) of a node that stays float32, else None."""
    if node.domain == DOMAIN:
        from ..ops.onnx import OPS

        schema = OPS[node.op_type].schema
        ins = [i for i, p in enumerate(schema.inputs) if p.type_str == "T" and i < len(node.input)]
        outs = [i for i, p in enumerate(schema.outputs) if p.type_str == "T" and i < len(node.output)]
        return ins, outs
    if node.domain in ("", "ai.onnx") and node.op_type in keep:
        is_float = lambda n: types.get(n, FLOAT) == FLOAT  # noqa: E731  (these ops are float-only)
        return ([i for i, n in enumerate(node.input) if n and is_float(n)],
                [i for i, n in enumerate(node.output) if n and is_float(n)])
    return None


def _retype_io(graph, elem: int, names: _Names, fp32_of: dict) -> tuple[list, dict]:
    """Cast nodes for the float graph inputs (head) and the new internal names of the float graph
    outputs; node inputs/outputs are renamed in place. -> (head nodes, output name -> internal name)."""
    from onnx import helper

    inits = {t.name for t in graph.initializer}
    rename_in, rename_out, head = {}, {}, []
    for v in graph.input:
        if v.name not in inits and v.type.tensor_type.elem_type == FLOAT:
            low = names(f"{v.name}__lowp")
            head.append(helper.make_node("Cast", [v.name], [low], to=elem, name=f"{v.name}__cast_in"))
            rename_in[v.name] = low
            fp32_of[low] = v.name
    for v in graph.output:
        if v.type.tensor_type.elem_type == FLOAT:
            rename_out[v.name] = names(f"{v.name}__lowp")
    for node in graph.node:
        for i, n in enumerate(node.input):
            node.input[i] = rename_out.get(rename_in.get(n, n), rename_in.get(n, n))
        for i, n in enumerate(node.output):
            node.output[i] = rename_out.get(n, n)
    return head, rename_out


def _islands(nodes, io: dict, elem: int, names: _Names, fp32_of: dict) -> tuple[list, list]:
    """Wrap every node of ``io`` (first output name -> float input/output indices) in Casts: float32 in, ``elem`` out;
    a value an island made in float32 goes to the next island as it is. -> (new node list, kept ops)."""
    from onnx import helper

    out, cast_in, kept = [], {}, []
    for node in nodes:
        spec = io.get(node.output[0]) if node.output else None
        if spec is None:
            out.append(node)
            continue
        ins, outs = spec
        for i in ins:
            name = node.input[i]
            if not name:
                continue
            if name not in fp32_of and name not in cast_in:
                cast_in[name] = names(f"{name}__fp32")
                out.append(helper.make_node("Cast", [name], [cast_in[name]], to=FLOAT, name=f"{cast_in[name]}__cast"))
            node.input[i] = fp32_of.get(name) or cast_in[name]
        out.append(node)
        for j in outs:
            name = node.output[j]
            if not name:
                continue
            f32 = names(f"{name}__fp32")
            node.output[j] = f32
            out.append(helper.make_node("Cast", [f32], [name], to=elem, name=f"{f32}__cast"))
            fp32_of[name] = f32
        kept.append(f"{node.domain + '::' if node.domain else ''}{node.op_type}")
    return out, kept


def _float32_only_inputs(nodes, elem: int, names: _Names) -> list:
    """Inputs ONNX types as float32 whatever T is (Resize scales): a Cast back to float32."""
    from onnx import helper

    out = []
    for node in nodes:
        for i in FLOAT32_ONLY_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
            if i < len(node.input) and node.input[i]:
                f32 = names(f"{node.input[i]}__f32only")
                out.append(helper.make_node("Cast", [node.input[i]], [f32], to=FLOAT, name=f"{f32}__cast"))
                node.input[i] = f32
        out.append(node)
    return out


def _drop_unused_casts(nodes, outputs: set) -> list:
    """Casts whose output nothing reads (an island output that went on in float32)."""
    def inputs(ns):
        for node in ns:
            yield from node.input
            for a in node.attribute:  # subgraphs read outer values by name
                for g in ([a.g] if a.g.node else []) + list(a.graphs):
                    yield from inputs(g.node)

    read = set(inputs(nodes)) | outputs
    return [n for n in nodes if not (n.op_type == "Cast" and n.output[0] not in read)]


def to_fp16(model, keep_fp32: Iterable[str] = (), dtype: str = "float16", reduction_fp32: bool = True):
    """A copy of ``model`` (onnx.ModelProto, float32) computing in float16 (or bfloat16) with float32 I/O,
    the edgetok nodes (unless ``reduction_fp32`` is False: for GPUs without float32 GEMM kernels, where
    they compute in float16 too) and the op types in ``keep_fp32`` in float32 (module docstring).
    Returns (model, {"kept_fp32": op counts, ...}). A graph already fp16 or int8 is refused."""
    import collections

    import onnx
    from onnx import helper

    if dtype not in DTYPES:
        raise PrecisionError(f"cannot cast an ONNX model to {dtype!r}; choose one of {', '.join(DTYPES)}")
    keep = set(keep_fp32)
    if keep - set(FP32_CANDIDATES):
        raise PrecisionError(f"keep_fp32 {sorted(keep - set(FP32_CANDIDATES))} not supported; choose from "
                             f"{', '.join(FP32_CANDIDATES)}")
    done = graph_precision(model)
    if done != "fp32":
        raise PrecisionError(f"the graph is already {done}; cast the float32 export instead")
    elem = DTYPES[dtype]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    types = _float_types(model)
    specs = [None if n.domain == DOMAIN and not reduction_fp32 else _island_io(n, types, keep) for n in g.node]  # by position: protobuf wrappers have no stable id
    names = _Names(g)
    fp32_of: dict[str, str] = {}
    head, out_names = _retype_io(g, elem, names, fp32_of)
    io = {n.output[0]: spec for n, spec in zip(g.node, specs) if spec is not None}
    inits = [_convert_tensor(t, elem) for t in g.initializer]
    del g.initializer[:]
    g.initializer.extend(inits)
    nodes = convert_nodes(list(g.node), elem)
    nodes, kept = _islands(nodes, io, elem, names, fp32_of)
    nodes = _float32_only_inputs(nodes, elem, names)
    tail = [helper.make_node("Identity" if low in fp32_of else "Cast", [fp32_of.get(low, low)], [orig],
                             name=f"{orig}__cast_out", **({} if low in fp32_of else {"to": FLOAT}))
            for orig, low in out_names.items()]
    del g.value_info[:]  # stale float32 annotations
    del g.node[:]
    g.node.extend(_drop_unused_casts(head + nodes + tail, {v.name for v in g.output}))
    for f in m.functions:  # edgetok bodies stay float32; any other local function follows its inputs
        if f.domain != DOMAIN or not reduction_fp32:
            converted = convert_nodes(list(f.node), elem)
            del f.node[:]
            f.node.extend(converted)
    _mark(m, "fp16" if elem == FLOAT16 else "bf16")
    return m, {"kept_fp32": dict(sorted(collections.Counter(kept).items())), "io_dtype": "float32",
               "compute_dtype": dtype, "reduction_ops": "float32" if reduction_fp32 else dtype}


# -- int8 ------------------------------------------------------------------------------------------------
class _Feeds:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts (built on first use,
    so importing this module does not import onnxruntime.quantization)."""

    def __new__(cls, feeds: list):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(feeds)

            def get_next(self):
                return next(self.it, None)

            def rewind(self):
                self.it = iter(feeds)

        return Reader()


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs advice on the root logger ("consider pre-processing"): keep it out
    of edgetok's output while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _name_nodes(graph) -> None:
    """A name for every unnamed standard-op node of the main graph (the quantizer selects nodes by name)."""
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name and node.domain in ("", "ai.onnx"):
            name, k = f"{node.op_type}_{i}", 0
            while name in used:
                k += 1
                name = f"{node.op_type}_{i}_{k}"
            node.name = name
            used.add(name)


def _linear_split(graph) -> tuple[list[str], list[str]]:
    """(names of the nodes quantized: MatMul with a constant B, Gemm, Conv; names of the float
    MatMuls, activation by activation: attention's QK^T and AV)."""
    consts = {t.name for t in graph.initializer}
    consts |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    quantized, skipped = [], []
    for n in graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in QUANTIZED_OPS:
            continue
        (quantized if n.op_type != "MatMul" or n.input[1] in consts else skipped).append(n.name)
    return quantized, skipped


def _float_edgetok_inputs(graph) -> int:
    """Set every edgetok node input that comes out of a DequantizeLinear of an activation back to the
    float tensor that was quantized. -> how many inputs were set back."""
    producer = {o: n for n in graph.node for o in n.output}
    fixed = 0
    for node in graph.node:
        if node.domain != DOMAIN:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                fixed += 1
    return fixed


def _qdq_counts(graph) -> dict:
    producer = {o: n for n in graph.node for o in n.output}
    done = {"quantized": {}, "float": {}}
    for n in graph.node:
        if n.domain in ("", "ai.onnx") and n.op_type in QUANTIZED_OPS:
            q = all(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input[:2])
            key = "quantized" if q else "float"
            done[key][n.op_type] = done[key].get(n.op_type, 0) + 1
    return done


def quantize_int8(model, feeds: Sequence[dict], scheme: str = "s8s8", per_channel: bool = True):
    """Static int8 quantization of ``model`` (float32 ModelProto) to Q/DQ with ONNX Runtime, calibrated
    on ``feeds`` (input name -> float32 array, one dict per batch). Quantizes the linear layers only
    (module docstring). -> (model, record)."""
    import tempfile

    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if scheme not in SCHEMES:
        raise PrecisionError(f"unknown int8 scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if graph_precision(model) != "fp32":
        raise PrecisionError(f"the graph is already {graph_precision(model)}; quantize the float32 export")
    if not feeds:
        raise PrecisionError("int8 quantization needs calibration images; pass --calibration DIR")
    s = SCHEMES[scheme]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _name_nodes(m.graph)
    quantized, skipped = _linear_split(m.graph)
    if not quantized:
        raise PrecisionError("the graph has no MatMul with constant weights, Gemm or Conv: int8 would change nothing")
    opset = {o.domain: o.version for o in m.opset_import}
    with tempfile.TemporaryDirectory(prefix="edgetok-int8-") as tmp, _quiet_quantizer():
        out = Path(tmp) / "model.int8.onnx"
        quantize_static(
            m, str(out), _Feeds(list(feeds)), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_quantize=quantized, per_channel=per_channel, reduce_range=s["reduce_range"],
            activation_type=QuantType.QInt8 if s["activation"] == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            # no CalibMaxIntermediateOutputs: onnxruntime 1.32's collect_data drops each full group unmerged;
            # MinMax keeps only per-tensor ReduceMin/ReduceMax outputs per batch, so memory stays small
            # QuantizeBias off: TensorRT's DequantizeLinear takes int8/uint8/fp8/int4 only, not the int32 bias
            # ORT makes ("input has type Int32 but must have type FP8, FP4, Int4, Int8, or UInt8"); biases stay float
            # no Q/DQ on the outputs of the quantized ops: only their inputs are quantized (TensorRT's
            # recommended placement; ORT CPU fuses DQ + MatMul into MatMulIntegerToFloat), so attention's
            # float MatMuls, the softmax and the edgetok ops read float values
            extra_options={"ActivationSymmetric": s["activation_symmetric"], "WeightSymmetric": True,
                           "QuantizeBias": False, "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)})
        q = onnx.load(str(out))
    fixed = _float_edgetok_inputs(q.graph)
    _check_quantized(m, q, opset)
    _mark(q, "int8")
    counts = _qdq_counts(q.graph)
    return q, {"format": "QDQ", "scheme": scheme, **s, "per_channel": per_channel, "calibrate_method": "MinMax",
               "bias": "float32",
               "quantized_ops": counts["quantized"], "float_ops": counts["float"],
               "float_matmuls": "attention (activation x activation)" if skipped else None,
               "edgetok_inputs_set_back_to_float": fixed, "quantizer": f"onnxruntime {onnxruntime.__version__}"}


def _check_quantized(before, after, opset: dict) -> None:
    """The quantizer must keep the edgetok nodes, their bodies and the opsets."""
    def edgetok(m):
        return sorted((n.name, n.op_type) for n in m.graph.node if n.domain == DOMAIN)

    def bodies(m):
        return sorted((f.domain, f.name, len(f.node)) for f in m.functions)

    if edgetok(after) != edgetok(before) or bodies(after) != bodies(before):
        raise PrecisionError("ONNX Runtime's quantizer changed the edgetok nodes or their function bodies; "
                             "this is an edgetok defect: please report it with your onnxruntime version")
    now = {o.domain: o.version for o in after.opset_import}
    if any(now.get(d) != v for d, v in opset.items()):
        raise PrecisionError(f"ONNX Runtime's quantizer changed the opsets {opset} to {now}; "
                             "this is an edgetok defect: please report it with your onnxruntime version")


# -- parity against the float32 graph ------------------------------------------------------------
def _outputs(model, feeds: Sequence[dict]) -> list[list[np.ndarray]]:
    from ..runtime.backends import ort_session

    session = ort_session(model)
    return [session.run(None, f) for f in feeds]


def parity(reference, candidate, feeds: Sequence[dict], what: str) -> dict:
    """``candidate`` against ``reference`` (ModelProtos) in ONNX Runtime CPU on ``feeds``: per float
    output the max abs error, that error relative to max |reference|, and the cosine similarity of each
    sample's output (flattened), mean and worst. ``what`` says what the inputs are."""
    ref, got = _outputs(reference, feeds), _outputs(candidate, feeds)
    names = [o.name for o in reference.graph.output]
    per = {}
    for k, name in enumerate(names):
        a = np.concatenate([r[k].reshape(r[k].shape[0], -1) for r in ref]).astype(np.float64)
        b = np.concatenate([g[k].reshape(g[k].shape[0], -1) for g in got]).astype(np.float64)
        if a.dtype.kind != "f" or not a.size or ref[0][k].dtype.kind != "f":
            continue
        err = float(np.abs(a - b).max())
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), 1.0)
        per[name] = {"max_abs_err": err, "max_rel_err": err / max(float(np.abs(a).max()), 1e-30),
                     "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if not per:
        raise PrecisionError("the model has no float output to compare; precision parity needs one")
    # the exporter's extra "features" output holds the reduced tokens, whose order follows the reduction's
    # discrete choices (which pairs merge, which tokens stay): a rounding that flips one choice reorders them,
    # so they are reported but the judgement is on the model's own outputs
    judged = {k: v for k, v in per.items() if k != FEATURES_OUTPUT} or per
    for name in per:
        per[name]["judged"] = name in judged
    worst = {k: (max if k.startswith("max") else min)(v[k] for v in judged.values())
             for k in ("max_abs_err", "max_rel_err", "cosine_mean", "cosine_min")}
    return {"reference": "the float32 graph, ONNX Runtime CPU", "inputs": what,
            "samples": int(sum(next(iter(f.values())).shape[0] for f in feeds)), **worst, "outputs": per}


def _judge(result: dict, tolerance: dict, precision: str) -> dict:
    failed = [f"{k} {result[k]:.4g} (limit {v:g})" for k, v in tolerance.items()
              if (result[k] > v if k.startswith("max") else result[k] < v)]
    if failed:
        raise PrecisionError(f"the {precision} graph differs from the float32 graph on {result['inputs']}: "
                             f"{'; '.join(failed)}; export fp32, or for int8 calibrate on more images like the "
                             "ones the model will see")
    return result | {"tolerance": dict(tolerance), "passed": True}


def _random_feeds(model, batch: int = 2, seed: int = 0) -> Optional[list[dict]]:
    """Seeded standard-normal feeds when every graph input is float with static sizes besides the batch."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if t.elem_type != FLOAT or any(d is None for d in dims[1:]):
            return None
        feed[v.name] = rng.standard_normal((dims[0] or batch, *dims[1:]), dtype=np.float32)
    return [feed] if feed else None


# -- the entry point ---------------------------------------------------------------------------------
def _input_spec(model) -> tuple[str, list]:
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = [v for v in model.graph.input if v.name not in inits]
    if len(graph_inputs) != 1:
        raise PrecisionError(f"calibration images feed a model with one image input; this one has "
                             f"{[v.name for v in graph_inputs]}: pass feeds (input name -> array) per batch")
    v = graph_inputs[0]
    return v.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "batch")
                    for d in v.type.tensor_type.shape.dim]


def _feeds(model, calibration, preprocessing, batch: int) -> list[dict]:
    """Calibration given as a folder/.npz path, an array, a list of arrays, or a list of feed dicts."""
    if isinstance(calibration, (str, Path, np.ndarray)):
        name, shape = _input_spec(model)
        return [{name: b} for b in calibration_batches(calibration, preprocessing, shape, batch)]
    items = list(calibration)
    if items and isinstance(items[0], dict):
        return items
    name, _ = _input_spec(model)
    return [{name: np.asarray(b, dtype=np.float32)} for b in items]


def _split(feeds: list[dict], holdout: float) -> tuple[list[dict], list[dict]]:
    """(calibration, held out for parity): the last ``holdout`` share of the batches, at least one when
    there are two or more."""
    if len(feeds) < 2 or holdout <= 0:
        return feeds, []
    k = min(len(feeds) - 1, max(1, round(len(feeds) * holdout)))
    return feeds[:-k], feeds[-k:]


def apply_precision(model, precision: str, calibration=None, *, target=None, preprocessing: Optional[dict] = None,
                    scheme: Optional[str] = None, keep_fp32: Iterable[str] = (), parity_feeds=None,
                    holdout: float = 0.2, check: bool = True, batch: int = 8) -> tuple:
    """``model`` (the full-form float32 ModelProto) written in ``precision`` -> (ModelProto, record).

    ``calibration`` (int8): a folder of images or an .npz (preprocessed with ``preprocessing``, the
    manifest's field), an array, or a list of batches / feed dicts; the last ``holdout`` share of its
    batches is kept out of the calibration and used for the parity check. ``target``: an ExportConfig,
    config name or backend name, checked by check_precision; its runtime picks the int8 scheme unless
    ``scheme`` is given (s8s8 everywhere by default: the graph TensorRT consumes, and ORT CPU runs it
    at the speed of u8s8 here). ``keep_fp32``: op types an fp16 graph keeps in float32 besides the edgetok
    ops. ``parity_feeds``: inputs for the parity check (default: held-out calibration batches, and seeded
    random normal batches for fp16). ``check``: raise PrecisionError when the parity is outside
    FP16_TOLERANCE / INT8_TOLERANCE. The record: {"precision", what was done, "parity": [...]}."""
    precision = check_precision(precision, target, calibration)
    if precision == "fp32":
        out = _copy(model)
        _mark(out, "fp32")
        return out, {"precision": "fp32", "io_dtype": "float32", "compute_dtype": "float32"}
    feeds = _feeds(model, calibration, preprocessing, batch) if calibration is not None else []
    if precision == "fp16":
        out, record = to_fp16(model, keep_fp32, reduction_fp32=fp32_gemm(target))
        checks = [(f, w) for f, w in ((_random_feeds(model), "random normal inputs, seed 0"),
                                      (parity_feeds or feeds[-2:] or None, "the images given")) if f]
        tolerance = FP16_TOLERANCE
        record |= {"ort_cpu_note": FP16_ORT_CPU}
    else:
        calib, held = _split(feeds, holdout)
        out, record = quantize_int8(model, calib, scheme or "s8s8")
        images = sum(next(iter(f.values())).shape[0] for f in calib)
        record["calibration"] = {"images": int(images), "batches": len(calib),
                                 "source": str(calibration) if isinstance(calibration, (str, Path)) else "in memory"}
        checks = [(parity_feeds, "the parity inputs given")] if parity_feeds else (
            [(held, "images held out of the calibration")] if held else [(calib, "the calibration images (no "
                                                                          "held-out batch: give more images)")])
        tolerance = INT8_TOLERANCE
    results = [parity(model, out, f, w) for f, w in checks]
    record = {"precision": precision, **record,
              "parity": [_judge(r, tolerance, precision) if check else r | {"tolerance": dict(tolerance)}
                         for r in results]}
    return out, record


def _copy(model):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m
