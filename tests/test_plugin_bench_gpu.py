"""benchmarks/bench_gpu.py, the GPU check and benchmark prepared for a lent GPU, runs its
CPU-only parts here: argument parsing, the models' token counts at each input size (built on
the meta device) and the kernel checks' code (through the references' fallback)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_covers_the_issue_configurations(bench, capsys):
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for model in ("vit_b16", "vit_l16"):
        for n in (197, 577, 1025):
            for batch in (1, 16):
                assert f"{model} N={n} " in out and f"batch {batch}:" in out
    assert "12 timing configurations" in out and "6/6 ok" in out
    assert bench.tome_r(16, 197) == 16 and bench.tome_r(8, 1025) == 42


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; a GPU is present")
def test_without_a_gpu_it_says_so(bench, capsys):
    assert bench.main(["--out", "/nonexistent/never-written.json"]) == 1
    assert "--dry-run" in capsys.readouterr().err
