"""Every reduction op against the independent naive reference (tests/naive.py),
on random inputs and on hypothesis-generated shapes with exact ties."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import edgetok  # noqa: F401  (registers the ops)
from edgetok.errors import ScheduleError
from edgetok.reduce.tome import max_merges

import naive
import pytest

TOL = 1e-5
ops = torch.ops.edgetok


def _inputs(b, n, c, ck, seed, tie_metric=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    if tie_metric:
        # one-hot metrics: cosine is exactly 0 or 1, so ties are exact on every backend
        metric = torch.nn.functional.one_hot(torch.randint(0, ck, (b, n), generator=g), ck).float()
    else:
        metric = torch.randn(b, n, ck, generator=g)
    size = torch.randint(1, 4, (b, n, 1), generator=g).float()
    return x, metric, size


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3), n=st.integers(2, 24), c=st.integers(1, 6), ck=st.integers(1, 5),
    protect=st.integers(0, 3), frac=st.floats(0, 1), ties=st.booleans(), seed=st.integers(0, 10_000),
)
def test_token_merge_matches_naive(b, n, c, ck, protect, frac, ties, seed):
    protect = min(protect, n)
    r = int(frac * max_merges(n, protect))
    x, metric, size = _inputs(b, n, c, ck, seed, ties)
    out, out_size = ops.token_merge(x, metric, size, r, protect)
    ref, ref_size = naive.tome(x, metric, size, r, protect)
    assert out.shape == (b, n - r, c)
    assert torch.allclose(out.double(), ref, atol=TOL)
    assert torch.equal(out_size.double(), ref_size)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3), n=st.integers(1, 24), c=st.integers(1, 6), protect=st.integers(0, 3),
    frac=st.floats(0, 1), fuse=st.booleans(), ties=st.booleans(), seed=st.integers(0, 10_000),
)
def test_token_drop_matches_naive(b, n, c, protect, frac, fuse, ties, seed):
    protect = min(protect, n)
    lo = max(protect, 1)
    keep = lo + int(frac * (n - lo))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    score = torch.randint(0, 3, (b, n), generator=g).float() if ties else torch.rand(b, n, generator=g)
    out, idx = ops.token_drop(x, score, keep, protect, int(fuse))
    ref, ref_idx = naive.drop(x, score, keep, protect, fuse)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(out.double(), ref, atol=TOL)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3), n=st.integers(2, 24), c=st.integers(1, 6), ck=st.integers(1, 5),
    protect=st.integers(0, 3), threshold=st.sampled_from([-1.0, 0.0, 0.3, 0.5, 0.9, 1.0]),
    ties=st.booleans(), pad=st.integers(0, 5), seed=st.integers(0, 10_000),
)
def test_threshold_merge_matches_naive(b, n, c, ck, protect, threshold, ties, pad, seed):
    protect = min(protect, n)
    x, metric, size = _inputs(b, n, c, ck, seed, ties)
    pad = min(pad, n - max(protect, 1))
    if pad > 0:  # padding (size 0, zero features) at the end, as a previous DyMU step leaves it
        size[0, n - pad :] = 0
        x = x * (size > 0)
    out, out_size, count = ops.threshold_merge(x, metric, size, threshold, protect)
    refs = naive.dymu(x, metric, size, threshold, protect)
    assert out.shape[1] == max(len(r[0]) for r in refs)
    for i, (rx, rs) in enumerate(refs):
        k = len(rx)
        assert int(count[i]) == k
        assert torch.allclose(out[i, :k].double(), rx, atol=TOL)
        assert torch.equal(out_size[i, :k].double(), rs)
        assert (out[i, k:] == 0).all() and (out_size[i, k:] == 0).all()


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), n=st.integers(1, 20), c=st.integers(1, 6), protect=st.integers(0, 2),
    threshold=st.sampled_from([0.0, 0.05, 0.5, 1.0, 2.5]), same=st.floats(0, 1), seed=st.integers(0, 10_000),
)
def test_diff_drop_matches_naive(b, n, c, protect, threshold, same, seed):
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(b, n, c, generator=g)
    unchanged = torch.rand(b, n, 1, generator=g) < same
    x = torch.where(unchanged, prev, torch.randn(b, n, c, generator=g))
    out, idx, count = ops.diff_drop(x, prev, threshold, protect)
    for i, (rx, kept) in enumerate(naive.dtd(x, prev, threshold, protect)):
        k = len(kept)
        assert int(count[i]) == k
        assert idx[i, :k].tolist() == kept and (idx[i, k:] == -1).all()
        assert torch.allclose(out[i, :k].double(), rx, atol=TOL)


def test_threshold_zero_keeps_every_token():
    x = torch.randn(2, 9, 4)
    out, idx, count = ops.diff_drop(x, x.clone(), 0.0, 0)
    assert torch.equal(out, x) and count.tolist() == [9, 9]


def test_merge_limits_are_clear_errors():
    x, metric, size = _inputs(1, 9, 4, 3, 0)
    with pytest.raises(ScheduleError, match="cannot merge r=5 tokens out of 9"):
        ops.token_merge(x, metric, size, 5, 1)
    with pytest.raises(ScheduleError, match="cannot keep 10 of 9"):
        ops.token_drop(x, metric[..., 0], 10, 1, 0)
