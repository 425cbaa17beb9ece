"""edgetok validate: JSON report, percentiles, parity, baseline, exit code on a missed budget."""
import json

import pytest
import torch

from edgetok.cli import main
from edgetok.validate import measure, validate
from edgetok.validate.latency import measure_interleaved


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                          num_classes=4).eval()
    d = tmp_path_factory.mktemp("v")
    torch.onnx.export(m, (torch.randn(1, 3, 32, 32),), str(d / "model.onnx"), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}}, dynamo=False, opset_version=17)
    torch.save(m, d / "model.pt")
    return d


def test_measure_percentiles_are_ordered():
    import time

    stats = measure(lambda: time.sleep(0.001), lambda: None, batch=4, runs=20, warmup=2)
    assert 1.0 <= stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.throughput == pytest.approx(4e3 / stats.mean_ms)


def test_interleaved_models_take_turns_run_by_run():
    order = []
    stats = measure_interleaved({"a": (lambda: order.append("a"), lambda: None),
                                 "b": (lambda: order.append("b"), lambda: None)}, batch=1, runs=3, warmup=2)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up per model, then one run each per round
    assert set(stats) == {"a", "b"} and stats["a"].runs == stats["b"].runs == 3


def test_report_json_parity_and_baseline(export, tmp_path):
    out = tmp_path / "r.json"
    r = validate(export, backend="ort-cpu", budget_ms=1e4, batch=2, runs=5, warmup=1, baseline=export, report_path=out)
    saved = json.loads(out.read_text())
    assert saved["passed"] is True and saved["model"]["latency"]["batch"] == 2
    assert saved["parity"]["ok"] and saved["parity"]["max_abs"] < 1e-4  # model.pt found next to the ONNX
    assert set(saved["speedup"]) == {"p50", "p99", "throughput", "flops_ideal"}
    assert r["machine"]["cpus"] >= 1


def test_cli_exit_code_on_missed_budget(export, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["validate", str(export), "--backend", "ort-cpu", "--budget-ms", "0.0001", "--runs", "3",
               "--warmup", "1", "--report", str(out)])
    assert rc == 1 and "exceeds the budget" in capsys.readouterr().err
    assert json.loads(out.read_text())["passed"] is False
    assert main(["validate", str(export), "--backend", "ort-cpu", "--budget-ms", "100000", "--runs", "3"]) == 0
