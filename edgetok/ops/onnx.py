"""ONNX form of the edgetok ops: one custom-domain node each, plus a function body.

For the dynamo exporter (``torch.onnx.export with dynamo=True``) every
``torch.ops.edgetok.*`` call is translated to one node of domain ``edgetok``
(op types TokenMerge, TokenDrop, ThresholdMerge, DiffDrop) that carries
``plugin_namespace="edgetok"`` and ``plugin_version="1"`` — the attributes the
TensorRT ONNX parser uses to find the IPluginV3 creator — plus the op's own
attributes. The node is emitted through an onnxscript ``Op`` with an explicit
``onnx.defs.OpSchema``: without a schema the exporter cannot tell the outputs
apart ("'tuple' object has no attribute 'dtype'").

Each op also has a body of standard ops (an onnxscript function in the
``edgetok`` domain, appended to the model as a local FunctionProto), so the
file runs in ONNX Runtime as is. The bodies implement the op contract of
``edgetok.reduce`` (the torch references are the oracle, see
tests/test_export_ops.py) under the rules of docs/ops.md:

- no ScatterElements/ScatterND: merging is a batched MatMul with a one-hot
  assignment matrix (Equal(dst[:, :, None], Range) -> Cast -> MatMul^T), and
  gathers are GatherND with batch_dims=1;
- selection by TopK (k <= 3840 tokens), whose ties go to the lower index,
  matching the stable sorts of the references;
- only ops whose semantics are the same in opsets 17..23, so one body serves
  every supported opset (the function's opset import is set to the model's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript import script, values

DOMAIN = "edgetok"
DOMAIN_VERSION = 1
PLUGIN_ATTRS = {"plugin_namespace": "edgetok", "plugin_version": "1"}
TOPK_LIMIT = 3840  # TensorRT's TopK k limit; bodies never ask for more

edgetok = values.Opset(DOMAIN, DOMAIN_VERSION)

# --------------------------------------------------------------------------
# Function bodies. Shapes come from the inputs (the batch axis is dynamic);
# attributes are referenced with Constant(value_*=@attr).
# --------------------------------------------------------------------------


@script(edgetok)
def TokenMerge(x, metric, size, r: int, protect_first: int):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    axis1 = op.Constant(value_ints=[1])
    big = op.Constant(value_ints=[9223372036854775807])
    k = op.Reshape(op.Constant(value_int=r), one)
    pf = op.Reshape(op.Constant(value_int=protect_first), one)
    pa = op.Div(op.Add(pf, one), two)
    pb = op.Div(pf, two)

    # cosine similarity of A (even) to B (odd) tokens, protected pairs -inf
    eps = op.CastLike(op.Constant(value_float=1e-6), metric)
    norm = op.Max(op.Sqrt(op.ReduceSum(op.Mul(metric, metric), op.Constant(value_ints=[-1]), keepdims=1)), eps)
    m = op.Div(metric, norm)
    ma = op.Slice(m, zero, big, axis1, two)
    mb = op.Slice(m, one, big, axis1, two)
    scores = op.MatMul(ma, op.Transpose(mb, perm=[0, 2, 1]))
    na = op.Shape(ma, start=1, end=2)
    nb = op.Shape(mb, start=1, end=2)
    ia = op.Range(op.Squeeze(zero), op.Squeeze(na), op.Squeeze(one))
    ib = op.Range(op.Squeeze(zero), op.Squeeze(nb), op.Squeeze(one))
    prot = op.Or(op.Unsqueeze(op.Less(ia, pa), one), op.Unsqueeze(op.Less(ib, pb), zero))
    scores = op.Where(prot, op.CastLike(op.Constant(value_float=float("-inf")), scores), scores)

    # each A row's best B (first on ties); the r best rows merge (TopK: ties -> lower index)
    best = op.ArgMax(scores, axis=-1, keepdims=1)
    best_score = op.Squeeze(op.GatherElements(scores, best, axis=-1), op.Constant(value_ints=[-1]))
    best = op.Squeeze(best, op.Constant(value_ints=[-1]))
    _, src = op.TopK(best_score, k, axis=-1, largest=1, sorted=1)
    dst = op.GatherElements(best, src, axis=1)

    # unmerged, unprotected A rows in ascending order: TopK over -position
    src_hot = op.Cast(op.Equal(op.Unsqueeze(src, op.Constant(value_ints=[-1])), ia), to=1)
    merged = op.Greater(op.ReduceSum(src_hot, axis1, keepdims=0), op.Constant(value_float=0.0))  # float32 one-hot
    iaf = op.Cast(ia, to=1)
    stay = op.And(op.Not(merged), op.Not(op.Less(ia, pa)))
    key = op.Where(stay, op.Neg(iaf), op.Constant(value_float=float("-inf")))
    _, unm = op.TopK(key, op.Sub(op.Sub(na, k), pa), axis=-1, largest=1, sorted=1)

    # size-weighted merge of src rows into their dst columns: one-hot MatMul, no scatter
    xa = op.Slice(x, zero, big, axis1, two)
    xb = op.Slice(x, one, big, axis1, two)
    sa = op.Slice(size, zero, big, axis1, two)
    sb = op.Slice(size, one, big, axis1, two)
    src_i = op.Unsqueeze(src, op.Constant(value_ints=[-1]))
    src_x = op.GatherND(op.Mul(xa, sa), src_i, batch_dims=1)
    src_s = op.GatherND(sa, src_i, batch_dims=1)
    dst_hot_t = op.Transpose(
        op.CastLike(op.Equal(op.Unsqueeze(dst, op.Constant(value_ints=[-1])), ib), x), perm=[0, 2, 1]
    )
    b_sum = op.Add(op.Mul(xb, sb), op.MatMul(dst_hot_t, src_x))
    b_size = op.Add(sb, op.MatMul(dst_hot_t, src_s))
    b_x = op.Div(b_sum, b_size)

    unm_i = op.Unsqueeze(unm, op.Constant(value_ints=[-1]))
    out = op.Concat(
        op.Slice(x, zero, pf, axis1),
        op.GatherND(xa, unm_i, batch_dims=1),
        op.Slice(b_x, pb, big, axis1),
        axis=1,
    )
    out_size = op.Concat(
        op.Slice(size, zero, pf, axis1),
        op.GatherND(sa, unm_i, batch_dims=1),
        op.Slice(b_size, pb, big, axis1),
        axis=1,
    )
    return out, out_size


@script(edgetok)
def TokenDrop(x, score, keep: int, protect_first: int, fuse_dropped: int):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    axis1 = op.Constant(value_ints=[1])
    k = op.Reshape(op.Constant(value_int=keep), one)
    pf = op.Reshape(op.Constant(value_int=protect_first), one)
    fuse = op.Reshape(op.Constant(value_int=fuse_dropped), one)

    n = op.Shape(x, start=1, end=2)
    pos = op.Range(op.Squeeze(zero), op.Squeeze(n), op.Squeeze(one))
    ranked = op.Where(op.Less(pos, pf), op.CastLike(op.Constant(value_float=float("inf")), score), score)
    _, top = op.TopK(ranked, k, axis=-1, largest=1, sorted=1)
    # kept indices in ascending order: TopK over -index
    negidx, _ = op.TopK(op.Neg(top), k, axis=-1, largest=1, sorted=1)
    idx = op.Neg(negidx)
    out = op.GatherND(x, op.Unsqueeze(idx, op.Constant(value_ints=[-1])), batch_dims=1)

    # EViT fused token: score-weighted mean of the dropped tokens (kept only when fuse_dropped=1)
    kept = op.ReduceSum(op.CastLike(op.Equal(op.Unsqueeze(idx, op.Constant(value_ints=[-1])), pos), score), axis1,
                        keepdims=0)
    w = op.Mul(score, op.Sub(op.CastLike(op.Constant(value_float=1.0), score), kept))
    wsum = op.Max(op.ReduceSum(w, op.Constant(value_ints=[-1]), keepdims=1),
                  op.CastLike(op.Constant(value_float=1e-6), score))
    fused = op.Div(op.MatMul(op.Unsqueeze(w, axis1), x), op.Unsqueeze(wsum, op.Constant(value_ints=[-1])))
    fused = op.Slice(fused, zero, fuse, axis1)
    return op.Concat(out, fused, axis=1), idx


@script(edgetok)
def ThresholdMerge(x, metric, size, threshold: float, protect_first: int):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    axis1 = op.Constant(value_ints=[1])
    last = op.Constant(value_ints=[-1])
    big = op.Constant(value_ints=[9223372036854775807])
    pf = op.Reshape(op.Constant(value_int=protect_first), one)
    pa = op.Div(op.Add(pf, one), two)
    pb = op.Div(pf, two)
    ninf = op.CastLike(op.Constant(value_float=float("-inf")), metric)

    eps = op.CastLike(op.Constant(value_float=1e-6), metric)
    norm = op.Max(op.Sqrt(op.ReduceSum(op.Mul(metric, metric), last, keepdims=1)), eps)
    m = op.Div(metric, norm)
    ma = op.Slice(m, zero, big, axis1, two)
    mb = op.Slice(m, one, big, axis1, two)
    scores = op.MatMul(ma, op.Transpose(mb, perm=[0, 2, 1]))
    na = op.Shape(ma, start=1, end=2)
    nb = op.Shape(mb, start=1, end=2)
    ia = op.Range(op.Squeeze(zero), op.Squeeze(na), op.Squeeze(one))
    ib = op.Range(op.Squeeze(zero), op.Squeeze(nb), op.Squeeze(one))
    prot = op.Or(op.Unsqueeze(op.Less(ia, pa), one), op.Unsqueeze(op.Less(ib, pb), zero))
    scores = op.Where(prot, ninf, scores)
    # padding (size 0) takes part in no pair
    sa = op.Slice(size, zero, big, axis1, two)
    sb = op.Slice(size, one, big, axis1, two)
    fzero = op.CastLike(op.Constant(value_float=0.0), size)
    va = op.Greater(op.Squeeze(sa, last), fzero)
    vb = op.Greater(op.Squeeze(sb, last), fzero)
    scores = op.Where(op.And(op.Unsqueeze(va, last), op.Unsqueeze(vb, axis1)), scores, ninf)

    best = op.ArgMax(scores, axis=-1, keepdims=1)
    best_score = op.GatherElements(scores, best, axis=-1)
    merged = op.Greater(best_score, op.CastLike(op.Constant(value_float=threshold), best_score))  # [B,Na,1]

    xa = op.Slice(x, zero, big, axis1, two)
    xb = op.Slice(x, one, big, axis1, two)
    w = op.Mul(sa, op.CastLike(merged, sa))
    dst_hot_t = op.Transpose(op.CastLike(op.Equal(best, ib), x), perm=[0, 2, 1])
    b_sum = op.Add(op.Mul(xb, sb), op.MatMul(dst_hot_t, op.Mul(xa, w)))
    b_size = op.Add(sb, op.MatMul(dst_hot_t, w))
    b_x = op.Div(b_sum, op.Max(b_size, op.CastLike(eps, b_size)))

    valid = op.Greater(op.Squeeze(size, last), fzero)
    cand_x = op.Concat(op.Slice(x, zero, pf, axis1), op.Slice(xa, pa, big, axis1), op.Slice(b_x, pb, big, axis1),
                       axis=1)
    cand_s = op.Concat(op.Slice(size, zero, pf, axis1), op.Slice(sa, pa, big, axis1),
                       op.Slice(b_size, pb, big, axis1), axis=1)
    cand_v = op.Concat(op.Slice(valid, zero, pf, axis1),
                       op.Slice(op.And(va, op.Not(op.Squeeze(merged, last))), pa, big, axis1),
                       op.Slice(vb, pb, big, axis1), axis=1)
    count = op.ReduceSum(op.Cast(cand_v, to=7), axis1, keepdims=0)

    # compact valid tokens to the front (original order), batch max count M; unique keys, so no ties
    nc = op.Shape(cand_v, start=1, end=2)
    pos = op.Cast(op.Range(op.Squeeze(zero), op.Squeeze(nc), op.Squeeze(one)), to=1)
    key = op.Where(cand_v, op.Neg(pos), op.Sub(op.Neg(pos), op.Cast(nc, to=1)))
    mmax, _ = op.TopK(op.Cast(count, to=1), one, axis=-1, largest=1, sorted=1)
    # Min with the static token count: TensorRT must bound every shape, and a count read
    # from data has no bound of its own ("checkVolume Assertion bound >= 0 failed")
    mcount = op.Min(op.Reshape(op.ReduceSum(op.Cast(mmax, to=7), keepdims=0), one), nc)
    _, order = op.TopK(key, mcount, axis=-1, largest=1, sorted=1)
    order_i = op.Unsqueeze(order, last)
    keepmask = op.CastLike(op.GatherND(cand_v, order_i, batch_dims=1), x)
    keepmask = op.Unsqueeze(keepmask, last)
    out = op.Mul(op.GatherND(cand_x, order_i, batch_dims=1), keepmask)
    out_size = op.Mul(op.GatherND(cand_s, order_i, batch_dims=1), keepmask)
    rows = op.Cast(op.Squeeze(mcount), to=6)  # M as a 0-D int32: the TensorRT plugin's size tensor
    return out, out_size, count, rows


@script(edgetok)
def DiffDrop(x, prev, threshold: float, protect_first: int):
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    last = op.Constant(value_ints=[-1])
    axis1 = op.Constant(value_ints=[1])
    pf = op.Reshape(op.Constant(value_int=protect_first), one)
    eps = op.CastLike(op.Constant(value_float=1e-6), x)

    num = op.ReduceSum(op.Mul(x, prev), last, keepdims=0)
    nx = op.Max(op.Sqrt(op.ReduceSum(op.Mul(x, x), last, keepdims=0)), eps)
    npv = op.Max(op.Sqrt(op.ReduceSum(op.Mul(prev, prev), last, keepdims=0)), eps)
    change = op.Sub(op.CastLike(op.Constant(value_float=1.0), x), op.Div(num, op.Mul(nx, npv)))
    # clamp to [0, 2] as the contract says: rounding must not drop an unchanged token at threshold 0
    change = op.Min(op.Max(change, op.CastLike(op.Constant(value_float=0.0), x)),
                    op.CastLike(op.Constant(value_float=2.0), x))
    n = op.Shape(x, start=1, end=2)
    pos_i = op.Range(op.Squeeze(zero), op.Squeeze(n), op.Squeeze(one))
    keep = op.Or(op.Not(op.Less(change, op.CastLike(op.Constant(value_float=threshold), x))), op.Less(pos_i, pf))
    count = op.ReduceSum(op.Cast(keep, to=7), axis1, keepdims=0)

    pos = op.Cast(pos_i, to=1)
    key = op.Where(keep, op.Neg(pos), op.Sub(op.Neg(pos), op.Cast(n, to=1)))
    mmax, _ = op.TopK(op.Cast(count, to=1), one, axis=-1, largest=1, sorted=1)
    mcount = op.Min(op.Reshape(op.ReduceSum(op.Cast(mmax, to=7), keepdims=0), one), n)  # bounded for TensorRT
    _, order = op.TopK(key, mcount, axis=-1, largest=1, sorted=1)
    order_i = op.Unsqueeze(order, last)
    valid = op.GatherND(keep, order_i, batch_dims=1)
    out = op.Mul(op.GatherND(x, order_i, batch_dims=1), op.Unsqueeze(op.CastLike(valid, x), last))
    idx = op.Where(valid, order, op.Constant(value_int=-1))
    return out, idx, count


# --------------------------------------------------------------------------
# Schemas, translations and the registry
# --------------------------------------------------------------------------

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _schema(name: str, inputs, outputs, attrs, doc: str) -> OpSchema:
    P = OpSchema.FormalParameter
    attributes = [OpSchema.Attribute(a, OpSchema.AttrType.INT if t == "int" else OpSchema.AttrType.FLOAT, d)
                  for a, t, d in attrs]
    attributes += [OpSchema.Attribute(k, OpSchema.AttrType.STRING, "TensorRT plugin lookup key") for k in PLUGIN_ATTRS]
    return OpSchema(
        name,
        DOMAIN,
        DOMAIN_VERSION,
        doc,
        inputs=[P(n, t) for n, t in inputs],
        outputs=[P(n, t) for n, t in outputs],
        type_constraints=[("T", _FLOATS, "token features"), ("I", ["tensor(int64)"], "indices and counts")],
        attributes=attributes,
    )


@dataclass(frozen=True)
class OnnxOp:
    """One edgetok op in ONNX: its schema, its body and its torch op."""

    name: str
    torch_op: Callable
    schema: OpSchema
    body: object  # onnxscript OnnxFunction
    attrs: tuple[str, ...]
    out_ranks: tuple[int, ...]

    @property
    def node_op(self) -> values.Op:
        return values.Op(edgetok, self.name, op_schema=self.schema)

    def translation(self) -> Callable:
        node_op, attrs = self.node_op, self.attrs

        returns = len(self.torch_op._schema.returns)

        def translate(*args):
            tensors, consts = args[: len(args) - len(attrs)], args[len(args) - len(attrs):]
            kwargs = dict(zip(attrs, consts))
            outs = node_op(*tensors, **kwargs, **PLUGIN_ATTRS)
            # outputs the plugin has and the torch op not (ThresholdMerge's size tensor) stay unused
            return outs[:returns] if isinstance(outs, tuple) and len(outs) > returns else outs

        return translate

    def function_proto(self, opset: int) -> onnx.FunctionProto:
        """The body as a model-local function, for a model of default-domain ``opset``."""
        proto = _scoped_names(self.body.to_function_proto())
        for imp in proto.opset_import:
            if imp.domain == "":
                imp.version = opset
        declared = set(proto.attribute) | {a.name for a in proto.attribute_proto}
        for a in (*self.attrs, *PLUGIN_ATTRS):
            if a not in declared:
                proto.attribute.append(a)
        return proto


OPS: dict[str, OnnxOp] = {
    o.name: o
    for o in [
        OnnxOp(
            "TokenMerge",
            torch.ops.edgetok.token_merge.default,
            _schema("TokenMerge", [("x", "T"), ("metric", "T"), ("size", "T")], [("x_out", "T"), ("size_out", "T")],
                    [("r", "int", "tokens merged"), ("protect_first", "int", "leading tokens never merged")],
                    "ToMe bipartite soft matching: [B,N,C] -> [B,N-r,C] and sizes [B,N-r,1]."),
            TokenMerge,
            ("r", "protect_first"),
            (3, 3),
        ),
        OnnxOp(
            "TokenDrop",
            torch.ops.edgetok.token_drop.default,
            _schema("TokenDrop", [("x", "T"), ("score", "T")], [("x_out", "T"), ("idx", "I")],
                    [("keep", "int", "tokens kept, protected included"),
                     ("protect_first", "int", "leading tokens always kept"),
                     ("fuse_dropped", "int", "1: append the score-weighted mean of dropped tokens")],
                    "Top-k keep (EViT): [B,N,C] -> [B,keep(+1),C] and kept indices [B,keep] ascending."),
            TokenDrop,
            ("keep", "protect_first", "fuse_dropped"),
            (3, 2),
        ),
        OnnxOp(
            "ThresholdMerge",
            torch.ops.edgetok.threshold_merge.default,
            _schema("ThresholdMerge", [("x", "T"), ("metric", "T"), ("size", "T")],
                    [("x_out", "T"), ("size_out", "T"), ("count", "I"), ("rows", "tensor(int32)")],
                    [("threshold", "float", "merge pairs with similarity above it"),
                     ("protect_first", "int", "leading tokens never merged")],
                    "DyMU threshold merging: padded [B,M,C], sizes [B,M,1] (0 = padding), count [B], and M "
                    "as a 0-D int32 (the size tensor TensorRT's plugin declares; the parser wants one node "
                    "output per plugin output)."),
            ThresholdMerge,
            ("threshold", "protect_first"),
            (3, 3, 1, 0),
        ),
        OnnxOp(
            "DiffDrop",
            torch.ops.edgetok.diff_drop.default,
            _schema("DiffDrop", [("x", "T"), ("prev", "T")], [("x_out", "T"), ("idx", "I"), ("count", "I")],
                    [("threshold", "float", "keep tokens with 1 - cos(x, prev) >= threshold"),
                     ("protect_first", "int", "leading tokens always kept")],
                    "DTD: changed tokens, padded [B,M,C], idx [B,M] (-1 = padding), count [B]."),
            DiffDrop,
            ("threshold", "protect_first"),
            (3, 2, 1),
        ),
    ]
}


def _scoped_names(proto: onnx.FunctionProto) -> onnx.FunctionProto:
    """Every value a body computes gets one name of its own, prefixed by the op, and its nodes
    are unnamed. TensorRT's graph compiler keeps body tensors by name: onnxscript calls every
    discarded output ``_`` (two TopKs in one body collide: "duplicate tensor name") and names
    nodes n0, n1, ... in every body alike ("node named n95 already exists"); an unnamed node
    gets a unique name from the parser."""
    formal = set(proto.input) | set(proto.output)
    renamed: dict[str, str] = {}
    for i, node in enumerate(proto.node):
        node.name = ""
        for j, name in enumerate(node.input):
            node.input[j] = renamed.get(name, name)
        for j, name in enumerate(node.output):
            if name and name not in formal:
                node.output[j] = renamed[name] = f"{proto.name}__{name if name != '_' else 'unused'}_{i}_{j}"
    return proto


def custom_translation_table() -> dict:
    """torch op -> onnxscript translation, for the custom_translation_table of torch.onnx.export."""
    return {o.torch_op: o.translation() for o in OPS.values()}


def add_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append the body of every edgetok op type the graph uses, and the edgetok opset import."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes = [n for n in _all_nodes(model.graph) if n.domain == DOMAIN]
    for n in nodes:
        name_outputs(n)
    used = sorted({n.op_type for n in nodes})
    have = {(f.domain, f.name) for f in model.functions}
    for name in used:
        if (DOMAIN, name) not in have:
            model.functions.append(OPS[name].function_proto(opset))
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


def name_outputs(node: onnx.NodeProto) -> None:
    """Give an edgetok node every output its schema lists, each with a name: TensorRT's
    parser wants exactly one non-empty node output per plugin output, and exporters drop
    or blank the ones nothing reads."""
    schema = OPS[node.op_type].schema
    stem = node.name or node.output[0]
    while len(node.output) < len(schema.outputs):
        node.output.append("")
    for i, p in enumerate(schema.outputs):
        if not node.output[i]:
            node.output[i] = f"{stem}_{p.name}"


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            for g in a.graphs:
                yield from _all_nodes(g)


_ELEM = {"I": onnx.TensorProto.INT64, "tensor(int32)": onnx.TensorProto.INT32}


def op_model(name: str, ranks: dict[str, int], attrs: dict, opset: int = 18, bodies: bool = True) -> onnx.ModelProto:
    """A model holding one edgetok node (float inputs of the given ranks, dynamic dims),
    for testing an op body or a plugin alone. Input/output names follow the op schema."""
    from onnx import TensorProto, helper

    spec = OPS[name]
    outs = [p.name for p in spec.schema.outputs]
    node = helper.make_node(name, list(ranks), outs, domain=DOMAIN, **attrs, **PLUGIN_ATTRS)
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [f"{k}_{i}" for i in range(r)])
              for k, r in ranks.items()]
    outputs = [
        helper.make_tensor_value_info(p.name, _ELEM.get(p.type_str, TensorProto.FLOAT),
                                      [f"{p.name}_{i}" for i in range(r)])
        for p, r in zip(spec.schema.outputs, spec.out_ranks)
    ]
    graph = helper.make_graph([node], name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return add_functions(model) if bodies else model
