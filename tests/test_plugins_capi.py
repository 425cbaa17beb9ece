"""The kernels library's C API without a GPU: it compiles (nvcc, one arch), loads, answers
its queries, and rejects bad arguments with one-line messages before touching the device."""
from __future__ import annotations

import ctypes

import pytest
import torch

from edgetok.ops import plugins


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    if plugins._nvcc() is None:
        pytest.skip("nvcc is needed to compile the kernels library")
    res = plugins.build(tmp_path_factory.mktemp("kernels"), archs=["75"], trt=False)
    return plugins.load_kernels(res.libraries["kernels"])


def _merge(lib, **kw):
    a = dict(dtype=0, b=2, n=197, c=64, ck=64, r=16, pf=1, ws=10**6)
    a.update(kw)
    fake = ctypes.c_void_p(0x1000)  # never dereferenced: every case fails validation first
    return lib.edgetok_token_merge(a["dtype"], fake, fake, fake, fake, fake, a["b"], a["n"], a["c"], a["ck"], a["r"],
                                   a["pf"], fake, a["ws"], None)


def test_queries(kernels):
    assert kernels.edgetok_abi_version() == plugins.ABI_VERSION
    assert kernels.edgetok_token_merge_workspace_size(64, 197) >= 64 * 99 * 8
    assert kernels.edgetok_threshold_merge_workspace_size(1, 197) == kernels.edgetok_token_merge_workspace_size(1, 197)
    assert kernels.edgetok_token_drop_workspace_size(8, 197) >= 8 * 197 * 4  # the dropped lists
    assert kernels.edgetok_token_drop_workspace_size(0, 197) == 0
    for n in (1, 197, 577, 1025, 2049, 4097, 10**6):  # every ViT token count, and far beyond
        assert kernels.edgetok_token_merge_supported(n, 64) and kernels.edgetok_token_drop_supported(n)
    assert not kernels.edgetok_token_merge_supported(197, 100_000)
    assert not kernels.edgetok_token_drop_supported(2 * 10**6)  # more output row tiles than a grid has


@pytest.mark.parametrize("kw, code, words", [
    (dict(r=99), 1, "lower r"),
    (dict(r=-1), 1, "cannot merge"),
    (dict(n=0), 1, "bad shape"),
    (dict(pf=300), 1, "bad shape"),
    (dict(ws=8), 3, "workspace"),
    (dict(ck=100_000), 4, "torch reference"),
    (dict(b=70_000), 1, "split the batch"),
])
def test_bad_arguments_are_rejected(kernels, kw, code, words):
    assert _merge(kernels, **kw) == code
    assert words in kernels.edgetok_last_error().decode()


def test_bad_drop_arguments(kernels):
    fake = ctypes.c_void_p(0x1000)
    assert kernels.edgetok_token_drop(0, fake, fake, fake, fake, 1, 10, 4, 11, 0, 0, fake, 10**6, None) == 1
    assert "cannot keep 11 of 10" in kernels.edgetok_last_error().decode()
    assert kernels.edgetok_token_drop(0, fake, fake, fake, fake, 1, 10, 4, 5, 0, 2, fake, 10**6, None) == 1
    # ABI 2: the drop plan lives in the workspace; a caller passing none is told what to ask for
    assert kernels.edgetok_token_drop(0, fake, fake, fake, fake, 1, 10, 4, 5, 0, 0, None, 0, None) == 3
    assert "edgetok_token_drop_workspace_size" in kernels.edgetok_last_error().decode()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path; a GPU is present")
def test_launch_without_a_gpu_reports_cuda_error(kernels):
    assert _merge(kernels, dtype=7) == 2  # unknown dtype code
    rc = _merge(kernels)
    assert rc == 5
    assert "CUDA device" in kernels.edgetok_last_error().decode()
