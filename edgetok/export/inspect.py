"""Summary of an exported ONNX model: edgetok nodes, attributes, token counts, bodies.

Reads the graph with onnx (external data not loaded) and the shapes the
exporter recorded (value_info), completed by ONNX shape inference; for a
``trt`` export (bodies stripped) the token counts still come from value_info.
"""
from __future__ import annotations

from pathlib import Path

from .targets import DOMAIN


def _dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def summarize(path) -> dict:
    import onnx

    from ..errors import EdgetokError

    p = Path(path)
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise EdgetokError(f"no ONNX model at {str(path)!r}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common base class
        raise EdgetokError(f"{str(p)!r} is not a readable ONNX model: {str(e).splitlines()[0] if str(e) else e}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort: keep what the exporter recorded
        inferred = model
    shapes = {v.name: _dims(v) for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    bodies = sorted(f.name for f in model.functions if f.domain == DOMAIN)
    nodes = []
    for n in model.graph.node:
        if n.domain != DOMAIN:
            continue
        attrs = {}
        for a in n.attribute:
            v = onnx.helper.get_attribute_value(a)
            attrs[a.name] = v.decode() if isinstance(v, bytes) else v
        tin, tout = shapes.get(n.input[0], []), shapes.get(n.output[0], [])
        nodes.append({
            "name": n.name,
            "op_type": n.op_type,
            "attributes": attrs,
            "tokens_in": tin[1] if len(tin) > 1 else None,
            "tokens_out": tout[1] if len(tout) > 1 else None,
            "body": n.op_type in bodies,
        })
    op_types = sorted({n["op_type"] for n in nodes})
    if not nodes:
        form = "standard ops only (inlined or unreduced)"
    elif all(t in bodies for t in op_types):
        form = "edgetok nodes with function bodies (portable / trt-override)"
    else:
        form = "edgetok nodes without bodies (trt: needs the edgetok TensorRT plugin)"
    manifest = p.parent / "manifest.json"
    return {
        "path": str(p),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": v.name, "shape": _dims(v)} for v in model.graph.input],
        "outputs": [{"name": v.name, "shape": _dims(v)} for v in model.graph.output],
        "nodes": len(model.graph.node),
        "edgetok_nodes": nodes,
        "function_bodies": bodies,
        "form": form,
        "manifest": str(manifest) if manifest.is_file() else None,
    }
