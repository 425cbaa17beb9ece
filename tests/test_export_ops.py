"""Each edgetok ONNX function body (run by ONNX Runtime CPU) against the torch reference.

Random shapes and protect_first counts; "tie" inputs use one-hot metrics and
integer scores so similarities are exactly equal in any summation order, and
both sides must then pick the lower index (ONNX TopK / stable sort)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import edgetok  # noqa: F401  (registers the torch ops)
from edgetok.ops.onnx import OPS, op_model
from edgetok.reduce.drop import top_k_drop
from edgetok.reduce.dtd import diff_drop
from edgetok.reduce.dymu import threshold_merge
from edgetok.reduce.tome import bipartite_merge, max_merges

SETTINGS = settings(max_examples=12, deadline=None)
_SESSIONS: dict = {}


def run(name: str, inputs: dict, attrs: dict, opset: int = 18):
    key = (name, tuple((k, v.dim()) for k, v in inputs.items()), tuple(sorted(attrs.items())), opset)
    if key not in _SESSIONS:
        model = op_model(name, {k: v.dim() for k, v in inputs.items()}, attrs, opset)
        onnx.checker.check_model(model, full_check=True)
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return _SESSIONS[key].run(None, {k: v.numpy() for k, v in inputs.items()})


def assert_same(got, ref, atol=1e-5):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        r = r.numpy()
        assert g.shape == r.shape, (g.shape, r.shape)
        if r.dtype == np.int64:
            np.testing.assert_array_equal(g, r)
        else:
            np.testing.assert_allclose(g, r, atol=atol, rtol=0)


def tensors(draw, b, n, c, ties: bool, gen):
    if ties:  # one-hot rows: cosine similarities exactly 0 or 1
        hot = torch.randint(0, 3, (b, n), generator=gen)
        return torch.nn.functional.one_hot(hot, 3).float() * (torch.randint(1, 4, (b, n, 1), generator=gen).float())
    return torch.randn(b, n, c, generator=gen)


shapes = st.tuples(st.integers(1, 3), st.integers(4, 24), st.integers(1, 6), st.integers(0, 3), st.booleans(),
                   st.integers(0, 2**16))


@SETTINGS
@given(shapes, st.floats(0.0, 1.0))
def test_token_merge(shape, frac):
    b, n, c, pf, ties, seed = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=gen)
    metric = tensors(None, b, n, 4, ties, gen)
    size = torch.randint(1, 4, (b, n, 1), generator=gen).float()
    r = round(frac * max_merges(n, pf))
    if r == 0:
        r = min(1, max_merges(n, pf))
    if r == 0:
        return
    got = run("TokenMerge", {"x": x, "metric": metric, "size": size}, {"r": r, "protect_first": pf})
    assert_same(got, bipartite_merge(x, metric, size, r, pf))


@SETTINGS
@given(shapes, st.floats(0.0, 1.0), st.booleans())
def test_token_drop(shape, frac, fuse):
    b, n, c, pf, ties, seed = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=gen)
    score = torch.randint(0, 3, (b, n), generator=gen).float() if ties else torch.rand(b, n, generator=gen)
    lo = max(pf, 1)
    keep = lo + round(frac * (n - lo))
    got = run("TokenDrop", {"x": x, "score": score}, {"keep": keep, "protect_first": pf, "fuse_dropped": int(fuse)})
    assert_same(got, top_k_drop(x, score, keep, pf, fuse))


@SETTINGS
@given(shapes, st.floats(-0.5, 0.95), st.integers(0, 3))
def test_threshold_merge(shape, threshold, pad):
    b, n, c, pf, ties, seed = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=gen)
    metric = tensors(None, b, n, 4, ties, gen)
    size = torch.randint(1, 4, (b, n, 1), generator=gen).float()
    size[0, n - min(pad, n - pf):] = 0  # padding (size 0) at the end of the first image
    if ties:
        threshold = 0.5  # similarities are exactly 0 or 1: decisions are exact
    got = run("ThresholdMerge", {"x": x, "metric": metric, "size": size}, {"threshold": threshold, "protect_first": pf})
    *got, rows = got  # the 0-D int32 row count, TensorRT's size tensor
    assert rows.dtype == np.int32 and rows.shape == () and rows == got[0].shape[1]
    assert_same(got, threshold_merge(x, metric, size, threshold, pf))


@SETTINGS
@given(shapes, st.floats(0.0, 1.5))
def test_diff_drop(shape, threshold):
    b, n, c, pf, ties, seed = shape
    gen = torch.Generator().manual_seed(seed)
    if ties:  # changes exactly 0 or 1
        x = tensors(None, b, n, c, True, gen)
        prev = torch.where(torch.rand(b, n, 1, generator=gen) < 0.5, x, x.roll(1, dims=-1))
        threshold = 0.5
    else:
        x = torch.randn(b, n, c, generator=gen)
        prev = x + torch.randn(b, n, c, generator=gen) * torch.rand(b, n, 1, generator=gen)
    got = run("DiffDrop", {"x": x, "prev": prev}, {"threshold": threshold, "protect_first": pf})
    assert_same(got, diff_drop(x, prev, threshold, pf))


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("opset", [17, 20, 23])
def test_bodies_valid_at_every_opset(name, opset):
    spec = OPS[name]
    ranks = {p.name: 2 if p.name == "score" else 3 for p in spec.schema.inputs}
    attrs = {a: 0.5 if a == "threshold" else 1 for a in spec.attrs}
    model = op_model(name, ranks, attrs, opset)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for f in model.functions for n in f.node}
    assert not ops & {"ScatterElements", "ScatterND", "Scatter"}, "bodies must not scatter"
    node = model.graph.node[0]
    got = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert got["plugin_namespace"] == b"edgetok" and got["plugin_version"] == b"1"
