"""Cast an ONNX model's float32 compute to float16/bfloat16 for strongly typed
TensorRT (TensorRT 11 dropped the fp16 builder flag: the types in the ONNX
decide the precision).

The model keeps float32 inputs and outputs (a Cast after each float input and
before each float output), so callers and manifests do not change. Inside the
graph and every local function body: float initializers are converted, every
float Constant gets a Cast after it (this also covers constants made from
attributes inside function bodies), Cast(to=float) becomes Cast(to=target) and
ConstantOfShape's float fill value is converted.
"""
from __future__ import annotations

from ..errors import EdgetokError

DTYPES = {"float16": 10, "bfloat16": 16}  # onnx.TensorProto enums


def _convert_tensor(t, elem):
    import numpy as np
    from onnx import TensorProto, numpy_helper

    if t.data_type != TensorProto.FLOAT:
        return t
    arr = numpy_helper.to_array(t)
    if elem == TensorProto.FLOAT16:
        # finite values beyond fp16's range (a -3.4e38 mask fill) saturate instead of turning into inf,
        # which would make 0 * inf = NaN where the float32 graph had a finite product
        lim = np.finfo(np.float16).max
        new = numpy_helper.from_array(np.where(np.isfinite(arr), np.clip(arr, -lim, lim), arr).astype(np.float16),
                                      t.name)
    else:
        import onnx.helper as h

        new = h.make_tensor(t.name, TensorProto.BFLOAT16, arr.shape, arr.astype(np.float32).ravel().tolist())
    return new


def _cast_nodes(nodes, elem, is_float_output):
    """Rewrite a node list in place; returns the new list."""
    import onnx.helper as h
    from onnx import TensorProto

    out = []
    for node in nodes:
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = elem
        elif node.op_type == "ConstantOfShape":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(_convert_tensor(a.t, elem))
        elif node.op_type == "Constant" and _literal_tensor(node):
            value = next(a for a in node.attribute if a.name == "value")
            value.t.CopyFrom(_convert_tensor(value.t, elem))
        elif node.op_type == "Constant" and is_float_output(node):  # a function attribute: cast at run time
            orig = node.output[0]
            node.output[0] = f"{orig}__f32"
            out.append(node)
            out.append(h.make_node("Cast", [node.output[0]], [orig], to=elem, name=f"{node.name or orig}__cast"))
            continue
        for a in node.attribute:  # subgraphs (If/Loop/Scan)
            if a.g.node:
                _cast_graph(a.g, elem, keep_io=False)
        out.append(node)
    return out


def _literal_tensor(node) -> bool:
    """A Constant holding a float32 tensor literal (converted in place, saturating like initializers)."""
    from onnx import TensorProto

    return any(a.name == "value" and not a.ref_attr_name and a.t.data_type == TensorProto.FLOAT
               for a in node.attribute)


def _constant_is_float(node) -> bool:
    from onnx import TensorProto

    for a in node.attribute:
        if a.name == "value":
            return a.t.data_type == TensorProto.FLOAT
        if a.name in ("value_float", "value_floats"):
            return True
    return False


def _cast_graph(graph, elem, keep_io: bool) -> None:
    import onnx.helper as h
    from onnx import TensorProto

    inits = [_convert_tensor(t, elem) for t in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    nodes = _cast_nodes(list(graph.node), elem, _constant_is_float)
    del graph.value_info[:]  # stale float32 annotations; shape inference recomputes them
    if keep_io:
        init_names = {t.name for t in graph.initializer}
        head = []
        for v in graph.input:
            if v.name in init_names or v.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            cast_name = f"{v.name}__{'f16' if elem == TensorProto.FLOAT16 else 'bf16'}"
            for n in nodes:
                for i, name in enumerate(n.input):
                    if name == v.name:
                        n.input[i] = cast_name
            head.append(h.make_node("Cast", [v.name], [cast_name], to=elem, name=f"{v.name}__cast_in"))
        tail = []
        for v in graph.output:
            if v.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            inner = f"{v.name}__lowp"
            for n in nodes:
                for i, name in enumerate(n.output):
                    if name == v.name:
                        n.output[i] = inner
                for i, name in enumerate(n.input):
                    if name == v.name:
                        n.input[i] = inner
            tail.append(h.make_node("Cast", [inner], [v.name], to=TensorProto.FLOAT, name=f"{v.name}__cast_out"))
        nodes = head + nodes + tail
    else:
        for v in list(graph.input) + list(graph.output):
            if v.type.tensor_type.elem_type == TensorProto.FLOAT:
                v.type.tensor_type.elem_type = elem
    del graph.node[:]
    graph.node.extend(nodes)


def cast_model(model, dtype: str = "float16"):
    """A copy of ``model`` (onnx.ModelProto) computing in ``dtype`` with float32 I/O."""
    import onnx

    if dtype not in DTYPES:
        raise EdgetokError(f"cannot cast an ONNX model to {dtype!r}; choose one of {', '.join(DTYPES)}")
    elem = DTYPES[dtype]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _cast_graph(m.graph, elem, keep_io=True)
    for f in m.functions:
        # function bodies are type-generic; only their constants and Casts pin float32
        nodes = _cast_nodes(list(f.node), elem, _constant_is_float)
        del f.node[:]
        f.node.extend(nodes)
    return m
