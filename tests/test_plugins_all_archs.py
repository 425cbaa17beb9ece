"""CI compiles the fused kernels for every listed GPU architecture on every change."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc (CUDA toolkit) is not installed, so the kernels cannot be compiled here")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_kernels_compile_for_every_architecture(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "build_plugins.sh"), str(tmp_path / "build")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plugins built for sm_{75,80,86,87,89,90}" in proc.stdout
