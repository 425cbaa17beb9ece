"""The CUDA kernels against the torch references, on a GPU (skipped without one).

Decisions (which tokens merge or are kept) must be identical: the metrics come from
test_plugins.tie_metric, whose scores are exact in every dtype, so ties are real ties.
Values: float32 within 1e-4 of the reference; float16 / bfloat16 against the float32
reference of the same (rounded) inputs within their rounding tolerance.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetok.ops import plugins
from edgetok.reduce.drop import top_k_drop
from edgetok.reduce.dymu import threshold_merge
from edgetok.reduce.tome import bipartite_merge, max_merges
from test_plugins import drop_case, drop_shapes, merge_case, merge_shapes, padded_sizes, pick_r

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {torch.float32: dict(rtol=0, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def kernels(tmp_path_factory):
    if plugins._nvcc() is None:
        pytest.skip("nvcc is needed to build the kernels for this GPU")
    major, minor = torch.cuda.get_device_capability()
    res = plugins.build(tmp_path_factory.mktemp("gpu"), archs=[f"{major}{minor}"], trt=False)
    lib = plugins.load_kernels(res.libraries["kernels"])
    mp = pytest.MonkeyPatch()
    mp.setattr(plugins, "_kernels_or_none", lambda: lib)
    yield lib
    mp.undo()


def _dev(dtype, *ts):
    return [t.to("cuda", dtype) for t in ts]


def _ref(dtype, *ts):
    """The float32 CPU reference inputs: the same values the kernel sees after rounding to dtype."""
    return [t.to(dtype).float() for t in ts]


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(shape=merge_shapes, dtype=st.sampled_from(DTYPES), data=st.data())
def test_token_merge_kernel(shape, dtype, data):
    g = torch.Generator().manual_seed(shape["seed"])
    n, protect = shape["n"], min(shape["protect"], shape["n"])
    x, metric, size = merge_case(g, shape["b"], n, shape["c"], shape["ck"], shape["pool"])
    r = pick_r(data, n, protect)
    want, want_size = bipartite_merge(*_ref(dtype, x, metric, size), r, protect)
    got, got_size = plugins.cuda_token_merge(*_dev(dtype, x, metric, size), r, protect)
    torch.testing.assert_close(got_size.float().cpu(), want_size, rtol=0, atol=0)  # decisions: exact
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])


@SETTINGS
@given(shape=drop_shapes, dtype=st.sampled_from(DTYPES), data=st.data())
def test_token_drop_kernel(shape, dtype, data):
    g = torch.Generator().manual_seed(shape["seed"])
    n = shape["n"]
    protect = min(shape["protect"], n)
    keep = data.draw(st.integers(max(protect, 1), n), label="keep")
    fuse = data.draw(st.integers(0, 1), label="fuse")
    x, score = drop_case(g, shape["b"], n, shape["c"], shape["levels"])
    want, want_idx = top_k_drop(*_ref(dtype, x, score), keep, protect, bool(fuse))
    got, idx = plugins.cuda_token_drop(*_dev(dtype, x, score), keep, protect, fuse)
    assert torch.equal(idx.cpu(), want_idx)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])


@SETTINGS
@given(shape=merge_shapes, dtype=st.sampled_from(DTYPES), data=st.data())
def test_threshold_merge_kernel(shape, dtype, data):
    g = torch.Generator().manual_seed(shape["seed"])
    n, protect = shape["n"], min(shape["protect"], shape["n"])
    x, metric, size = merge_case(g, shape["b"], n, shape["c"], shape["ck"], shape["pool"])
    if data.draw(st.booleans(), label="padding"):
        size = padded_sizes(g, size)
    thr = (data.draw(st.integers(-17, 16), label="threshold step") + 0.5) / 16
    want, want_size, want_count = threshold_merge(*_ref(dtype, x, metric, size), thr, protect)
    got, got_size, count = plugins.cuda_threshold_merge(*_dev(dtype, x, metric, size), thr, protect)
    assert torch.equal(count.cpu(), want_count)
    torch.testing.assert_close(got_size.float().cpu(), want_size, rtol=0, atol=0)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])


def test_vit_shapes_float32_random_metric():
    """ViT-B/16 at 224 (197 tokens, head dim 64, 768 channels), continuous metric."""
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(8, 197, 768, generator=g), torch.randn(8, 197, 64, generator=g)
    size = torch.randint(1, 4, (8, 197, 1), generator=g).float()
    want, want_size = bipartite_merge(x, metric, size, 16, 1)
    got, got_size = plugins.cuda_token_merge(*_dev(torch.float32, x, metric, size), 16, 1)
    torch.testing.assert_close(got_size.cpu(), want_size, rtol=0, atol=0)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("n", [577, 1025, 2049, 4097, 6001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_token_counts(n, dtype):
    """Up to ViT-L/16 at 1024 px (4097 tokens) and beyond: the drop plan leaves shared memory
    for the workspace from about 2,600 tokens, the merge plan from about 5,000."""
    g = torch.Generator().manual_seed(n)
    x, metric, size = merge_case(g, 2, n, 96, 64, 5)
    r = max_merges(n, 1) // 2
    want, want_size = bipartite_merge(*_ref(dtype, x, metric, size), r, 1)
    got, got_size = plugins.cuda_token_merge(*_dev(dtype, x, metric, size), r, 1)
    torch.testing.assert_close(got_size.float().cpu(), want_size, rtol=0, atol=0)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])
    xd, score = drop_case(g, 2, n, 96, 5)
    want, want_idx = top_k_drop(*_ref(dtype, xd, score), n // 3, 1, True)
    got, idx = plugins.cuda_token_drop(*_dev(dtype, xd, score), n // 3, 1, 1)
    assert torch.equal(idx.cpu(), want_idx)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])
    size = padded_sizes(g, size)
    want, want_size, want_count = threshold_merge(*_ref(dtype, x, metric, size), 0.5 / 16, 1)
    got, got_size, count = plugins.cuda_threshold_merge(*_dev(dtype, x, metric, size), 0.5 / 16, 1)
    assert torch.equal(count.cpu(), want_count)
    torch.testing.assert_close(got_size.float().cpu(), want_size, rtol=0, atol=0)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])


def test_registered_ops_run_the_kernels_and_capture_in_a_cuda_graph():
    plugins.register_cuda_kernels()
    g = torch.Generator().manual_seed(0)
    x, metric, size = _dev(torch.float16, *merge_case(g, 4, 197, 384, 64, 5))
    score = torch.rand(4, 197, device="cuda", dtype=torch.float16)
    eager = torch.ops.edgetok.token_merge(x, metric, size, 16, 1)
    eager_drop = torch.ops.edgetok.token_drop(x, score, 120, 1, 1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as CUDA graphs require
        torch.ops.edgetok.token_merge(x, metric, size, 16, 1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.edgetok.token_merge(x, metric, size, 16, 1)
        captured_drop = torch.ops.edgetok.token_drop(x, score, 120, 1, 1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    assert torch.equal(captured_drop[1], eager_drop[1]) and torch.equal(captured_drop[0], eager_drop[0])


def test_mixed_dtypes_fall_back_to_the_reference():
    g = torch.Generator().manual_seed(0)
    x, metric, size = merge_case(g, 2, 33, 8, 16, 4)
    x, metric, size = x.cuda(), metric.cuda().half(), size.cuda()
    got, _ = plugins.cuda_token_merge(x, metric, size, 4, 1)
    want, _ = bipartite_merge(x, metric, size, 4, 1)
    assert torch.equal(got, want)
