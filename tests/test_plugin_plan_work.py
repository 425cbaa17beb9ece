"""Every kernel computes its plan once per image, with O(N log N) work (docs/plugins.md).

The CPU library (plugins/src/host_reference.cpp) runs each op's launches block by block over
the kernels' own grids (plugins/include/edgetok/launch.h), calling the block bodies the CUDA
kernels call. The plan functions announce themselves (begin_plan) and count their inner-loop
iterations (tick), per image. So if a plan were computed inside the output blocks again, as
the old merge_output_kernel did for every (channel tile x row tile), these counts would show
it: one plan per output block instead of one per image.
"""
from __future__ import annotations

import ctypes
import math
import re
from pathlib import Path

import pytest
import torch

from test_plugins import (drop_case, host_threshold_merge, host_token_drop, host_token_merge, hostref,  # noqa: F401
                          merge_case, padded_sizes)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def plan_stats(lib, b):
    """Per image: (plans begun, plan iterations, plan phases, blocks run) of the last op call."""
    out = (ctypes.c_int64 * (4 * b))()
    assert lib.edgetok_host_plan_stats(out, b) == b
    return [tuple(out[4 * i: 4 * i + 4]) for i in range(b)]


def output_blocks(lib, rows, c):
    grid = (ctypes.c_uint * 3)()
    lib.edgetok_host_output_grid(1, rows, c, grid)
    return grid[0] * grid[1]


def run_op(lib, op, n, c, b=3, seed=0):
    """Runs one op on the CPU library; returns (elements its plan sorts, output rows per image)."""
    g = torch.Generator().manual_seed(seed)
    x, metric, size = merge_case(g, b, n, c, 8, 4)
    if op == "merge":
        r = min(16, (n - 1) // 2)
        host_token_merge(lib, x, metric, size, r, 1)
        return (n + 1) // 2, n - r
    if op == "drop":
        _, score = drop_case(g, b, n, c, 5)
        keep = max(1, (7 * n) // 10)
        host_token_drop(lib, x, score, keep, 1, 1)
        return n, keep + 1
    _, _, count = host_threshold_merge(lib, x, metric, padded_sizes(g, size), 0.5 / 16, 1)
    return (n + 1) // 2, int(count.max())


@pytest.mark.parametrize("op", ["merge", "drop", "threshold"])
@pytest.mark.parametrize("n, c", [(197, 768), (577, 256), (1025, 160)])
def test_each_plan_is_computed_once_per_image(hostref, op, n, c):
    elements, rows = run_op(hostref, op, n, c)
    for plans, _, phases, blocks in plan_stats(hostref, 3):
        assert plans == 1, f"{op}: the plan ran {plans} times for one image"
        assert blocks == 1 + output_blocks(hostref, rows, c)  # the plan block, then gather-only blocks
        assert phases <= 2 * math.log2(elements) + 10  # barriers: sort passes + a fixed few


@pytest.mark.parametrize("op", ["merge", "drop", "threshold"])
@pytest.mark.parametrize("n", [197, 577, 1025, 2049, 4097])
def test_plan_work_grows_as_n_log_n(hostref, op, n):
    """At most 10 L log2 L iterations for L sorted elements, plus the scans' fixed per-thread
    cost; the per-element ranking this replaced did L^2 per output block."""
    elements, _ = run_op(hostref, op, n, 4, b=1)
    (_, ticks, _, _), = plan_stats(hostref, 1)
    threads = hostref.edgetok_host_threads()
    assert ticks <= 10 * elements * math.log2(elements) + 16 * threads, (op, n, ticks)


def test_docs_give_the_measured_plan_counts(hostref):
    """docs/plugins.md's "after" column is what this build counts for its stated input: one
    image, x and a 64-wide metric from torch.randn with seed 0, r = 16, protect_first = 1."""
    text = DOCS.read_text()
    for n in (197, 577, 1025):
        g = torch.Generator().manual_seed(0)
        x, metric = torch.randn(1, n, 8, generator=g), torch.randn(1, n, 64, generator=g)
        host_token_merge(hostref, x, metric, torch.ones(1, n, 1), 16, 1)
        (plans, ticks, _, _), = plan_stats(hostref, 1)
        assert plans == 1
        rows = [line for line in text.splitlines() if re.match(rf"\|\s*{n}\s*\|", line)]
        assert rows, f"no row for N={n} in {DOCS}"
        for line in rows:
            assert f"{ticks:,}" in line, f"docs/plugins.md row for N={n} should give {ticks:,} plan iterations"
