"""The kernels' per-row logic on the CPU, against the torch references.

plugins/src/host_reference.cpp runs the kernels' phases (plugins/include/edgetok/
rowops.h, the same functions the CUDA kernels call) sequentially on float32; these
tests build it with CMake (g++ only, no CUDA), load it with ctypes and compare it
with edgetok.reduce's references over hypothesis-generated shapes with many ties.

The case generators here are shared with tests/test_plugins_gpu.py.
"""
from __future__ import annotations

import ctypes
import shutil
from contextlib import contextmanager, nullcontext

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetok.ops import plugins
from edgetok.reduce.drop import top_k_drop
from edgetok.reduce.dymu import threshold_merge
from edgetok.reduce.tome import bipartite_merge, max_merges

# --- case generators (ties by construction, exactly representable scores) ----------------


def tie_metric(gen: torch.Generator, b: int, n: int, ck: int, pool: int) -> torch.Tensor:
    """Metric rows drawn from a small pool of vectors with entries in {-1, 0, 1} and 1, 4 or 16
    non-zeros (norm 1, 2 or 4): every cosine similarity is a multiple of 1/16, exact in fp32,
    fp16 and bf16 whatever the summation order, so ties are exact ties in every implementation
    and distinct scores are at least 1/16 apart."""
    vecs = torch.zeros(pool, ck)
    for p in range(pool):
        choices = [k for k in (1, 4, 16) if k <= ck]
        nnz = choices[int(torch.randint(0, len(choices), (1,), generator=gen))]
        pos = torch.randperm(ck, generator=gen)[:nnz]
        vecs[p, pos] = torch.randint(0, 2, (nnz,), generator=gen).float() * 2 - 1
    picks = torch.randint(0, pool, (b, n), generator=gen)
    return vecs[picks]


def merge_case(gen, b, n, c, ck, pool, sizes=True):
    x = torch.randn(b, n, c, generator=gen)
    metric = tie_metric(gen, b, n, ck, pool)
    size = torch.randint(1, 5, (b, n, 1), generator=gen).float() if sizes else torch.ones(b, n, 1)
    return x, metric, size


def drop_case(gen, b, n, c, levels):
    """Scores from a few integer levels (many ties), non-negative like attention weights."""
    x = torch.randn(b, n, c, generator=gen)
    score = torch.randint(0, levels, (b, n), generator=gen).float() / levels
    return x, score


def padded_sizes(gen, size: torch.Tensor) -> torch.Tensor:
    """Zero (padding) sizes on a random tail of each image, as a previous adaptive step leaves."""
    b, n, _ = size.shape
    out = size.clone()
    for i in range(b):
        valid = int(torch.randint(1, n + 1, (1,), generator=gen))
        out[i, valid:] = 0
    return out


merge_shapes = st.fixed_dictionaries({
    "b": st.integers(1, 3), "n": st.integers(2, 40), "c": st.integers(1, 9), "ck": st.integers(1, 20),
    "pool": st.integers(1, 6), "protect": st.integers(0, 3), "seed": st.integers(0, 2**16),
})
drop_shapes = st.fixed_dictionaries({
    "b": st.integers(1, 3), "n": st.integers(1, 40), "c": st.integers(1, 9), "levels": st.integers(1, 5),
    "protect": st.integers(0, 3), "seed": st.integers(0, 2**16),
})


def pick_r(data, n, protect):
    return data.draw(st.integers(0, max_merges(n, protect)), label="r")


# --- the CPU library -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostref(tmp_path_factory):
    if shutil.which("cmake") is None or shutil.which("g++") is None:
        pytest.skip("cmake and g++ are needed to build the CPU test library")
    res = plugins.build(tmp_path_factory.mktemp("plugins"), kernels=False, trt=False)
    return load_hostref(res.libraries["hostref"])


def load_hostref(path):
    lib = ctypes.CDLL(str(path))
    for name in ("match_smem", "plan_smem", "plan_scratch", "merge_workspace", "drop_workspace"):
        getattr(lib, f"edgetok_host_{name}").restype = ctypes.c_size_t
    for name in ("merge_workspace", "drop_workspace"):
        getattr(lib, f"edgetok_host_{name}").argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.edgetok_host_supported.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.edgetok_host_threshold_merge.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4 + [
        ctypes.c_float, ctypes.c_int]
    return lib


def _p(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def host_token_merge(lib, x, metric, size, r, protect):
    b, n, c = x.shape
    out, out_size = torch.empty(b, n - r, c), torch.empty(b, n - r, 1)
    lib.edgetok_host_token_merge(_p(x), _p(metric), _p(size), _p(out), _p(out_size), b, n, c, metric.shape[-1], r,
                                 protect)
    return out, out_size


def host_token_drop(lib, x, score, keep, protect, fuse):
    b, n, c = x.shape
    out, idx = torch.empty(b, keep + fuse, c), torch.empty(b, keep, dtype=torch.int64)
    lib.edgetok_host_token_drop(_p(x), _p(score), _p(out), _p(idx), b, n, c, keep, protect, fuse)
    return out, idx


def host_threshold_merge(lib, x, metric, size, thr, protect):
    b, n, c = x.shape
    out, out_size = torch.full((b * n * c,), float("nan")), torch.full((b * n,), float("nan"))
    count = torch.empty(b, dtype=torch.int64)
    m = lib.edgetok_host_threshold_merge(_p(x), _p(metric), _p(size), _p(out), _p(out_size), _p(count), b, n, c,
                                         metric.shape[-1], thr, protect)
    # written as the kernel writes it: [B, M, C] with M = the batch max, into a buffer of the upper bound
    return out[: b * m * c].view(b, m, c), out_size[: b * m].view(b, m, 1), count


def host_match(lib, metric, size, protect):
    b, n, ck = metric.shape
    na = (n + 1) // 2
    best, bidx = torch.empty(b, na), torch.empty(b, na, dtype=torch.int32)
    lib.edgetok_host_match(_p(metric), _p(size) if size is not None else None, b, n, ck, protect, _p(best),
                           _p(bidx))
    return best, bidx.long()


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(shape=merge_shapes, data=st.data())
def test_token_merge_matches_reference(hostref, shape, data):
    g = torch.Generator().manual_seed(shape["seed"])
    n, protect = shape["n"], min(shape["protect"], shape["n"])
    x, metric, size = merge_case(g, shape["b"], n, shape["c"], shape["ck"], shape["pool"])
    r = pick_r(data, n, protect)
    want, want_size = bipartite_merge(x, metric, size, r, protect)
    got, got_size = host_token_merge(hostref, x, metric, size, r, protect)
    torch.testing.assert_close(got_size, want_size, rtol=0, atol=0)  # sizes are small integers: exact
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@SETTINGS
@given(shape=merge_shapes)
def test_match_picks_the_first_best_column(hostref, shape):
    """Best score and index of every A row; the index must be torch's (first max)."""
    from edgetok.reduce.tome import similarity

    g = torch.Generator().manual_seed(shape["seed"])
    protect = min(shape["protect"], shape["n"])
    _, metric, _ = merge_case(g, shape["b"], shape["n"], 1, shape["ck"], shape["pool"])
    if shape["n"] < 2:
        return
    want_best, want_idx = similarity(metric, protect).max(dim=-1)
    best, idx = host_match(hostref, metric, None, protect)
    assert torch.equal(best, want_best)  # exact: the scores are multiples of 1/16
    finite = torch.isfinite(want_best)
    assert torch.equal(idx[finite], want_idx[finite])


@SETTINGS
@given(shape=drop_shapes, data=st.data())
def test_token_drop_matches_reference(hostref, shape, data):
    g = torch.Generator().manual_seed(shape["seed"])
    n = shape["n"]
    protect = min(shape["protect"], n)
    keep = data.draw(st.integers(max(protect, 1), n), label="keep")
    fuse = data.draw(st.integers(0, 1), label="fuse")
    x, score = drop_case(g, shape["b"], n, shape["c"], shape["levels"])
    want, want_idx = top_k_drop(x, score, keep, protect, bool(fuse))
    got, idx = host_token_drop(hostref, x, score, keep, protect, fuse)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@SETTINGS
@given(shape=merge_shapes, data=st.data())
def test_threshold_merge_matches_reference(hostref, shape, data):
    g = torch.Generator().manual_seed(shape["seed"])
    n, protect = shape["n"], min(shape["protect"], shape["n"])
    x, metric, size = merge_case(g, shape["b"], n, shape["c"], shape["ck"], shape["pool"])
    if data.draw(st.booleans(), label="padding"):
        size = padded_sizes(g, size)
    thr = (data.draw(st.integers(-17, 16), label="threshold step") + 0.5) / 16  # between score levels
    want, want_size, want_count = threshold_merge(x, metric, size, thr, protect)
    got, got_size, count = host_threshold_merge(hostref, x, metric, size, thr, protect)
    assert torch.equal(count, want_count)
    torch.testing.assert_close(got_size, want_size, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_random_metric_without_constructed_ties(hostref):
    """Continuous metrics (no exact score grid): the same decisions and values."""
    g = torch.Generator().manual_seed(1)
    x, size = torch.randn(2, 197, 24, generator=g), torch.randint(1, 4, (2, 197, 1), generator=g).float()
    metric = torch.randn(2, 197, 64, generator=g)
    want, want_size = bipartite_merge(x, metric, size, 16, 1)
    got, got_size = host_token_merge(hostref, x, metric, size, 16, 1)
    torch.testing.assert_close(got_size, want_size, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- edge cases, thread order, token counts up to 4097 and beyond -----------------------


@contextmanager
def reversed_threads(lib):
    lib.edgetok_host_set_reverse(1)
    try:
        yield
    finally:
        lib.edgetok_host_set_reverse(0)


@SETTINGS
@given(shape=merge_shapes, data=st.data())
def test_plans_do_not_depend_on_thread_order(hostref, shape, data):
    """A plan phase reads only what earlier phases wrote (the kernels' barriers): running each
    block's threads in reverse gives the same bytes. A thread reading another thread's write of
    the same phase would see it in one order and not in the other."""
    g = torch.Generator().manual_seed(shape["seed"])
    n, protect = shape["n"], min(shape["protect"], shape["n"])
    x, metric, size = merge_case(g, shape["b"], n, shape["c"], shape["ck"], shape["pool"])
    r = pick_r(data, n, protect)
    keep = data.draw(st.integers(max(protect, 1), n), label="keep")
    xd, score = drop_case(g, shape["b"], n, shape["c"], 3)
    size_pad = padded_sizes(g, size)
    runs = []
    for order in ("forward", "reverse"):
        with reversed_threads(hostref) if order == "reverse" else nullcontext():
            runs.append((host_token_merge(hostref, x, metric, size, r, protect),
                         host_token_drop(hostref, xd, score, keep, protect, 1),
                         host_threshold_merge(hostref, x, metric, size_pad, 0.5 / 16, protect)))
    for a, b in zip(*runs):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)


@pytest.mark.parametrize("n, protect", [(1, 0), (1, 1), (2, 0), (2, 1), (3, 1), (4, 2), (5, 3), (197, 1),
                                        (198, 1), (577, 5), (1025, 1)])
def test_token_merge_edges_of_r(hostref, n, protect):
    """r = 0, 1, half and the maximum, odd and even N, metrics with many exact ties."""
    g = torch.Generator().manual_seed(n)
    x, metric, size = merge_case(g, 2, n, 5, 8, 3)
    limit = max_merges(n, protect)
    for r in sorted({0, min(1, limit), limit // 2, limit}):
        want, want_size = bipartite_merge(x, metric, size, r, protect)
        got, got_size = host_token_merge(hostref, x, metric, size, r, protect)
        assert torch.equal(got_size, want_size), r
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 197, 1025])
def test_token_drop_edges_of_keep(hostref, n):
    g = torch.Generator().manual_seed(n)
    x, score = drop_case(g, 2, n, 5, 2)
    for protect in (0, 1):
        for keep in sorted({max(protect, 1), n // 2 or 1, n}):
            for fuse in (0, 1):
                want, want_idx = top_k_drop(x, score, keep, protect, bool(fuse))
                got, idx = host_token_drop(hostref, x, score, keep, protect, fuse)
                assert torch.equal(idx, want_idx)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_drop_ranks_signed_zero_nan_and_inf_as_torch_sort(hostref):
    """-0 ties +0 (lower index first), NaN ranks above +inf, +inf ties the protected tokens."""
    nan, inf = float("nan"), float("inf")
    score = torch.tensor([[0.0, -0.0, 0.0, nan, inf, -inf, 0.5, -0.0, nan, inf, 0.0, -0.5]])
    x = torch.arange(12.0).view(1, 12, 1)
    for protect in (0, 1, 2):
        for keep in range(max(protect, 1), 13):
            _, want_idx = top_k_drop(x, score, keep, protect, False)
            assert torch.equal(host_token_drop(hostref, x, score, keep, protect, 0)[1], want_idx), (protect, keep)


@pytest.mark.parametrize("n", [2049, 4097, 6001])
def test_large_token_counts(hostref, n):
    """ViT-L/16 at 1024 px has 4097 tokens; plans too large for shared memory take a workspace
    slice (drop from about 2,600 tokens, merge from about 5,000): every op still runs and matches."""
    g = torch.Generator().manual_seed(n)
    x, metric, size = merge_case(g, 1, n, 3, 4, 3)
    r = max_merges(n, 1) // 3
    want, want_size = bipartite_merge(x, metric, size, r, 1)
    got, got_size = host_token_merge(hostref, x, metric, size, r, 1)
    assert torch.equal(got_size, want_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    xd, score = drop_case(g, 1, n, 3, 4)
    want, want_idx = top_k_drop(xd, score, n // 3, 1, True)
    got, idx = host_token_drop(hostref, xd, score, n // 3, 1, 1)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    size = padded_sizes(g, size)
    want, want_size, want_count = threshold_merge(x, metric, size, 0.5 / 16, 1)
    got, got_size, count = host_threshold_merge(hostref, x, metric, size, 0.5 / 16, 1)
    assert torch.equal(count, want_count)
    assert torch.equal(got_size, want_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --- launch configuration (host code of the CUDA launchers) ----------------------------


def test_launch_config_fits_shared_memory(hostref):
    budget = 48 * 1024
    for ck in (1, 16, 64, 128, 384, 768, 1024):
        chunk = hostref.edgetok_host_match_chunk(ck)
        assert 1 <= chunk <= 64
        assert hostref.edgetok_host_match_smem(ck) <= budget
    assert hostref.edgetok_host_match_chunk(64) == 64  # ViT heads: whole warps of B columns per stage
    assert hostref.edgetok_host_match_chunk(10_000) == 0  # too wide: reported unsupported, not overflowed
    for n in (1, 2, 50, 197, 577, 1025, 2049, 4097, 10_000):
        assert hostref.edgetok_host_supported(n, 64, 0) and hostref.edgetok_host_supported(n, 64, 1)
        assert hostref.edgetok_host_plan_smem(n) <= budget
    # merge plans rank the ceil(N/2) A rows, drop plans all N tokens
    assert all(hostref.edgetok_host_plan_smem((n + 1) // 2) > 0 for n in (197, 577, 1025, 2049, 4097))
    assert all(hostref.edgetok_host_plan_smem(n) > 0 for n in (197, 577, 1025, 2049))
    assert hostref.edgetok_host_plan_smem(4097) == 0  # drop at 4097 tokens: scratch in the workspace
    limit = 65535 * 16  # output row tiles are the grid's y dimension
    assert hostref.edgetok_host_supported(limit, 64, 1) and not hostref.edgetok_host_supported(limit + 1, 64, 1)


def test_workspace_and_grid(hostref):
    merge_ws, drop_ws, scratch = (hostref.edgetok_host_merge_workspace, hostref.edgetok_host_drop_workspace,
                                  hostref.edgetok_host_plan_scratch)
    ws = merge_ws(64, 197)
    assert ws >= 64 * 4 * (2 * 99 + 197 + 99 + 99) and ws % 256 == 0  # best, bidx, src, boff, blist
    assert merge_ws(0, 197) == 0 and drop_ws(0, 197) == 0
    assert drop_ws(2, 2049) < scratch(2049)  # plan in shared memory: only the dropped lists
    assert drop_ws(2, 4097) >= 2 * scratch(4097)  # one scratch slice per image
    assert merge_ws(3, 6001) >= 3 * scratch(3001)
    # TensorRT sizes the workspace for the profile's largest shape: it must cover every smaller one
    for ws_fn in (merge_ws, drop_ws):
        for b in (1, 4):
            sizes = [ws_fn(b, n) for n in range(1, 6200, 23)]
            assert sizes == sorted(sizes)
    grid = (ctypes.c_uint * 3)()
    hostref.edgetok_host_output_grid(8, 181, 768, grid)
    assert tuple(grid) == (6, 12, 8)  # 128-channel x 16-row tiles x batch
    hostref.edgetok_host_output_grid(1, 5, 3, grid)
    assert tuple(grid) == (1, 1, 1)


def test_max_merges_agrees_with_python(hostref):
    for n in range(1, 30):
        for p in range(0, 4):
            assert hostref.edgetok_host_max_merges(n, p) == max_merges(n, p)


# --- the Python side: locating, registering, falling back ----------------------------


def test_library_lookup_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETOK_PLUGIN_DIR", str(tmp_path))
    assert plugins.build_dir() == tmp_path
    assert plugins.find_library("kernels") is None
    with pytest.raises(FileNotFoundError, match="edgetok plugins build"):
        plugins.library_path("kernels")
    (tmp_path / "libedgetok_kernels.so").write_bytes(b"")
    assert plugins.find_library("kernels") == tmp_path / "libedgetok_kernels.so"
    with pytest.raises(plugins.EdgetokError, match="unknown plugin library"):
        plugins.find_library("nope")


def test_cuda_registration_keeps_cpu_reference():
    plugins.register_cuda_kernels()
    plugins.register_cuda_kernels()  # idempotent
    g = torch.Generator().manual_seed(0)
    x, metric, size = merge_case(g, 2, 17, 4, 8, 3)
    out, out_size = torch.ops.edgetok.token_merge(x, metric, size, 3, 1)
    want, want_size = bipartite_merge(x, metric, size, 3, 1)
    assert torch.equal(out, want) and torch.equal(out_size, want_size)


def test_cuda_impls_fall_back_without_library(monkeypatch):
    """Without the built library the CUDA implementations are the references (run here on CPU tensors)."""
    monkeypatch.setattr(plugins, "_kernels_or_none", lambda: None)
    g = torch.Generator().manual_seed(0)
    x, metric, size = merge_case(g, 2, 17, 4, 8, 3)
    out, _ = plugins.cuda_token_merge(x, metric, size, 0, 1)
    assert torch.equal(out, x) and out is not x
    xd, score = drop_case(g, 2, 17, 4, 3)
    assert torch.equal(plugins.cuda_token_drop(xd, score, 5, 1, 1)[1], top_k_drop(xd, score, 5, 1, True)[1])
    got = plugins.cuda_threshold_merge(x, metric, size, 0.4, 1)
    assert torch.equal(got[2], threshold_merge(x, metric, size, 0.4, 1)[2])
    with pytest.raises(plugins.EdgetokError, match="lower r"):
        plugins.cuda_token_merge(x, metric, size, 99, 1)


def test_cli_plugins_info_and_path(tmp_path, monkeypatch):
    from edgetok.cli import main

    monkeypatch.setenv("EDGETOK_PLUGIN_DIR", str(tmp_path))
    assert main(["plugins", "info"]) == 0
    assert main(["plugins", "path"]) == 1  # not built: one-line error naming the fix
