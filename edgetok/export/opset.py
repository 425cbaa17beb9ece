"""Writing a graph at an opset below the exporter's: exactly, or not at all.

torch's dynamo exporter emits opset 18 at the lowest; asked for 17 it runs a
version converter that fails half-way on real graphs (a Reduce* node's axes)
and then keeps opset 18 while the caller believes 17. TensorRT 8.5/8.6
(JetPack 5) parses opset <= 17, so edgetok exports at 18 and converts down
itself: every node whose operator changed between the two opsets is rewritten
by an adapter below, and a node no adapter covers is an error naming it, never
a silently newer graph. The result is checked by the ONNX checker at the
target opset by the caller.
"""
from __future__ import annotations

import onnx
from onnx import numpy_helper

from ..errors import EdgetokError

EXPORTER_MIN_OPSET = 18
# opset 18 moved `axes` from an attribute to an input on these (ReduceSum did in 13)
_AXES_TO_ATTRIBUTE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                      "ReduceLogSumExp", "ReduceSumSquare"}


class OpsetError(EdgetokError, ValueError):
    """The graph cannot be written at the opset asked for."""


def _changed(op_type: str, low: int, high: int) -> bool:
    """Whether the default-domain operator's definition differs between opsets ``low`` and ``high``."""
    try:
        return onnx.defs.get_schema(op_type, low).since_version != onnx.defs.get_schema(op_type, high).since_version
    except onnx.defs.SchemaError:  # not defined at ``low``
        return True


def _constants(nodes, initializers) -> dict[str, onnx.TensorProto]:
    found = {t.name: t for t in initializers}
    for n in nodes:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            value = next((a for a in n.attribute if a.name == "value" and not a.ref_attr_name), None)
            if value is not None:
                found[n.output[0]] = value.t
    return found


def _axes_to_attribute(node: onnx.NodeProto, constants: dict) -> None:
    noop = [a for a in node.attribute if a.name == "noop_with_empty_axes"]  # opset 18's, not 17's
    for a in noop:
        node.attribute.remove(a)
    if len(node.input) < 2 or not node.input[1]:
        if any(a.i for a in noop):
            raise OpsetError(f"{node.op_type} node {node.name!r} is a no-op on empty axes, which opset 17 cannot "
                             "say: export at opset 18 or later")
        return  # no axes: reduce over all, the same in both opsets
    if node.input[1] not in constants:
        raise OpsetError(f"{node.op_type} node {node.name!r} takes its axes from data; opset 17 needs constant "
                         "axes: export at opset 18 or later")
    axes = numpy_helper.to_array(constants[node.input[1]]).astype("int64").ravel().tolist()
    del node.input[1:]
    node.attribute.append(onnx.helper.make_attribute("axes", axes))


def _downgrade_nodes(nodes, initializers, target: int, where: str) -> None:
    constants = _constants(nodes, initializers)
    for node in nodes:
        for attr in node.attribute:  # subgraphs (If/Loop/Scan)
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _downgrade_nodes(g.node, g.initializer, target, where)
        if node.domain not in ("", "ai.onnx") or not _changed(node.op_type, target, EXPORTER_MIN_OPSET):
            continue
        if node.op_type in _AXES_TO_ATTRIBUTE:
            _axes_to_attribute(node, constants)
        else:
            raise OpsetError(f"{where}: operator {node.op_type} changed in opset {EXPORTER_MIN_OPSET} and edgetok "
                             f"cannot write it at opset {target}; export at opset {EXPORTER_MIN_OPSET} or later")


def downgrade(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` (opset 18) rewritten in place for default-domain opset ``target`` < 18."""
    if target >= EXPORTER_MIN_OPSET:
        return model
    _downgrade_nodes(model.graph.node, model.graph.initializer, target, "the graph")
    for f in model.functions:
        _downgrade_nodes(f.node, [], target, f"function {f.domain}.{f.name}")
    for imports in [model.opset_import, *(f.opset_import for f in model.functions)]:
        for o in imports:
            if o.domain in ("", "ai.onnx"):
                o.version = target
    return model
