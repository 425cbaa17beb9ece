"""`edgetok export --schedule auto --target CONFIG` with FAKE cost tables put in the
cost cache (timing is a benchmark, not a test): the chosen r reaches the ONNX
nodes and the manifest, r=0 when nothing pays off, TensorRT configs refused."""
from __future__ import annotations

import json

import pytest
import timm

from edgetok.cli import main
from edgetok.patch import adapter_for
from edgetok.tune import auto as A

pytestmark = pytest.mark.slow

DEPTH = 4
TINY = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
        "--model-arg", "embed_dim=32", "--model-arg", f"depth={DEPTH}", "--model-arg", "num_heads=2"]


def fake_table(cache, step_ms: float, backend: str = "ort-cpu", batch: int = 1) -> dict:
    """A cost table under the key the export's measurement looks up: blocks cost
    1 ms per token (half of it the MLP), each reduction step ``step_ms``."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=DEPTH, num_heads=2)
    key = A.cache_key(adapter_for(vit).info(vit), backend, batch) | {"method": "tome"}
    grid = [4, 8, 12, 17]
    A.save_table(A.CostTable(key, grid, [float(n) for n in grid], [n / 2 for n in grid], [step_ms] * 4, 1.0),
                 cache)
    return key


def run(tmp_path, *args):
    out = tmp_path / "out"
    rc = main(["export", *TINY, "--schedule", "auto", "--cost-cache", str(tmp_path / "costs"), *args,
               "--output", str(out)])
    return rc, out


def test_auto_schedule_reaches_the_graph_and_the_manifest(tmp_path, capsys):
    key = fake_table(tmp_path / "costs", step_ms=0.1)
    rc, out = run(tmp_path, "--target", "cpu-ort", "--min-speedup", "1.2")
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    s = m["schedule"]
    assert s["source"] == "auto" and s["reduced"] and s["goal_met"] and s["goal"] == {"min_speedup": 1.2}
    assert s["predicted_speedup"] >= 1.2 and s["backend"] == "ort-cpu" and s["batch"] == 1
    assert s["cost_table"] == key and sum(s["r"]) > 0
    assert m["params"]["r"] == s["r"] and m["config"] == "cpu-ort" and m["target"] == "portable"
    merged = [n["attributes"]["r"] for n in m["edgetok_ops"] if n["op_type"] == "TokenMerge"]
    assert merged == [r for r in s["r"] if r]
    # independently of the exporter's check: the same seeded model, reduced by the chosen r, in torch
    import numpy as np
    import onnxruntime as ort
    import torch

    import edgetok
    from edgetok.patch.models import create_model

    model = edgetok.apply(create_model("vit_tiny_patch16_224", model_args=dict(img_size=32, patch_size=8, embed_dim=32,
                                                                              depth=DEPTH, num_heads=2), seed=0),
                          "tome", r=s["r"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() <= 1e-4
    err = capsys.readouterr().err
    assert f"r={s['r']}" in err and "met" in err


def test_nothing_pays_off_gives_r0_and_says_why(tmp_path, capsys):
    fake_table(tmp_path / "costs", step_ms=100.0)
    rc, out = run(tmp_path, "--config", "cpu-ort", "--budget-ms", "40")
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    s = m["schedule"]
    assert s["r"] == [0] * DEPTH and not s["reduced"] and s["predicted_speedup"] == 1.0
    assert "keeping r=0" in s["reason"] and s["goal"] == {"budget_ms": 40.0}
    assert m["edgetok_ops"] == [] and m["flops"]["ratio"] == 1.0
    assert "keeping r=0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, words",
    [
        (["--target", "jetson-orin-nano", "--min-speedup", "1.2"], "use an ONNX Runtime target"),
        (["--target", "cpu-ort"], "exactly one goal"),
        (["--target", "cpu-ort", "--min-speedup", "1.2", "--budget-ms", "3"], "exactly one goal"),
        (["--min-speedup", "1.2"], "--target CONFIG"),
        (["--target", "cpu-ort", "--min-speedup", "1.2", "--r", "2"], "either --r or --schedule auto"),
        (["--target", "cpu-ort", "--min-speedup", "1.2", "--method", "dymu"], "does not take"),
        (["--target", "nosuch-device", "--min-speedup", "1.2"], "unknown export config 'nosuch-device'"),
    ],
)
def test_bad_auto_requests_fail_in_one_line(tmp_path, capsys, args, words):
    rc, out = run(tmp_path, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and words in err[-1]
    assert not out.exists() and not (tmp_path / "costs").exists()  # refused before anything was measured
