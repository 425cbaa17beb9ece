"""Whole-model export: every method x every registered adapter family (one tiny
random-weight model each). The exported model passes the full ONNX checker,
runs in ONNX Runtime CPU and matches the torch reduced model (<= 1e-4) at batch
1 and 4; trt has no bodies, portable one per op type, inlined only standard
ops; exporting twice gives identical bytes; polygraphy runs the portable file."""
from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import edgetok
from edgetok.export import apply_target, export_model
from edgetok.export.exporter import ExportError
from edgetok.patch import ADAPTERS

pytestmark = pytest.mark.slow

SMALL_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8)


def _timm():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=5)


def _hf(cls, cfg_cls, **extra):
    def build():
        import transformers as t

        cfg = dict(SMALL_HF, **extra)
        if "dinov2" in cfg_cls.lower():
            del cfg["intermediate_size"]
            cfg["mlp_ratio"] = 2
        return getattr(t, cls)(getattr(t, cfg_cls)(**cfg))

    return build


def _torchvision():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=5)


# one tiny model per adapter family; a new family needs an entry here
FAMILIES = {
    "timm-vit": _timm,
    "hf-vit": _hf("ViTForImageClassification", "ViTConfig", num_labels=5),
    "hf-clip": _hf("CLIPVisionModel", "CLIPVisionConfig"),
    "hf-siglip": _hf("SiglipVisionModel", "SiglipVisionConfig"),
    "hf-dinov2": _hf("Dinov2Model", "Dinov2Config"),
    "hf-dinov2-registers": _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=2),
    "torchvision-vit": _torchvision,
}
METHODS = {
    "tome": dict(r=2),
    "drop": dict(keep_rate=0.6, fuse_dropped=True),
    "dymu": dict(threshold=0.2),
}
OP_TYPE = {"tome": "TokenMerge", "drop": "TokenDrop", "dymu": "ThresholdMerge"}
# getNbOutputs of each TensorRT plugin, read from its source
PLUGIN_OUTPUTS = {
    name: int(count) for name, count in re.findall(
        r"class (\w+)Plugin final.*?getNbOutputs\(\) const noexcept override \{ return (\d+); \}",
        (Path(__file__).parents[1] / "plugins" / "trt" / "plugins.cpp").read_text(), flags=re.S)
}
assert set(PLUGIN_OUTPUTS) == {"TokenMerge", "TokenDrop", "ThresholdMerge"}, PLUGIN_OUTPUTS


@functools.lru_cache(maxsize=None)
def model(family):
    if family not in FAMILIES:
        pytest.fail(f"adapter family {family!r} has no tiny test model: add one to FAMILIES in {__file__}")
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


@functools.lru_cache(maxsize=None)
def exported(family, method, tmp_root):
    reduced = edgetok.apply(model(family), method, **METHODS[method])
    return reduced, export_model(reduced, f"{tmp_root}/{family}-{method}", model_name=family)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("export"))


def ort_outputs(proto_or_path, x):
    src = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": x.numpy()})


def torch_outputs(m, x):
    with torch.no_grad():
        return [t.numpy() for t in torch.utils._pytree.tree_leaves(m(x)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", [a.family for a in ADAPTERS])
def test_export_every_method_and_adapter(family, method, tmp_root):
    reduced, result = exported(family, method, tmp_root)
    m = result.manifest.model_dump(mode="json")
    # the exporter already checked (full checker, ORT parity at batch 1 and 4); check again independently
    onnx.checker.check_model(str(result.onnx_path), full_check=True)
    proto = onnx.load(str(result.onnx_path))
    nodes = [n for n in proto.graph.node if n.domain == "edgetok"]
    assert nodes and {n.op_type for n in nodes} == {OP_TYPE[method]}
    assert [f.name for f in proto.functions if f.domain == "edgetok"] == [OP_TYPE[method]]  # one body per op type
    for b in (1, 4):
        x = torch.randn(b, *m["input"]["shape"][1:], generator=torch.Generator().manual_seed(b))
        for got, ref in zip(ort_outputs(proto, x), torch_outputs(reduced, x)):
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() <= 1e-4
    assert max(m["parity"]["max_abs_err"].values()) <= 1e-4
    assert m["input"]["shape"][0] == "batch" and m["method"] == method and m["family"] == family

    trt = apply_target(onnx.load(str(result.onnx_path)), "trt")
    assert not trt.functions and [n.op_type for n in trt.graph.node if n.domain == "edgetok"] == [n.op_type
                                                                                                  for n in nodes]
    # TensorRT's parser wants one named node output per plugin output
    for n in (n for n in trt.graph.node if n.domain == "edgetok"):
        assert len(n.output) == PLUGIN_OUTPUTS[n.op_type] and all(n.output), (n.op_type, list(n.output))
    inlined = apply_target(onnx.load(str(result.onnx_path)), "inlined")
    assert not inlined.functions and all(n.domain in ("", "ai.onnx") for n in inlined.graph.node)
    onnx.checker.check_model(inlined, full_check=True)
    x = torch.randn(4, *m["input"]["shape"][1:])
    for got, ref in zip(ort_outputs(inlined, x), torch_outputs(reduced, x)):
        assert np.abs(got - ref).max() <= 1e-4


def test_manifest_fields_and_hash(tmp_root):
    _, result = exported("timm-vit", "tome", tmp_root)
    m = json.loads(result.manifest_path.read_text())
    import hashlib

    from edgetok.runtime.manifest import Manifest

    assert list(m) == list(Manifest.model_fields)
    assert m["sha256"] == hashlib.sha256(result.onnx_path.read_bytes()).hexdigest()
    assert m["tokens"] == [17, 15, 13] and m["params"]["r"] == [2, 2]
    assert m["flops"]["ratio"] > 1 and m["flops"]["total"] < m["flops"]["baseline"]
    assert m["edgetok_ops"][0]["attributes"] == {"r": 2, "protect_first": 1, "plugin_namespace": "edgetok",
                                                 "plugin_version": "1"}
    assert m["preprocessing"]["size"] == [32, 32] and len(m["preprocessing"]["mean"]) == 3
    assert set(m["versions"]) >= {"torch", "onnx", "onnxruntime", "edgetok"}


def test_export_is_deterministic_and_targets(tmp_root, tmp_path):
    reduced, first = exported("timm-vit", "tome", tmp_root)
    again = export_model(reduced, tmp_path / "again", model_name="timm-vit")
    assert first.onnx_path.read_bytes() == again.onnx_path.read_bytes()
    # re-exporting into an existing export directory replaces it
    trt = export_model(reduced, tmp_path / "again", target="trt", model_name="timm-vit")
    proto = onnx.load(str(trt.onnx_path))
    assert not proto.functions and trt.manifest.target == "trt" and trt.manifest.function_bodies == []
    assert trt.manifest.parity["checked_on"] == "portable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temporary directories left


@pytest.mark.skipif(shutil.which("polygraphy") is None and not (
        __import__("pathlib").Path(sys.executable).parent / "polygraphy").exists(), reason="polygraphy CLI missing")
def test_polygraphy_runs_portable(tmp_root):
    _, result = exported("timm-vit", "drop", tmp_root)
    exe = str(__import__("pathlib").Path(sys.executable).parent / "polygraphy")
    proc = subprocess.run([exe, "run", str(result.onnx_path), "--onnxrt", "--input-shapes",
                           "pixel_values:[2,3,32,32]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASSED" in proc.stdout + proc.stderr


def test_exporter_failure_leaves_nothing(tmp_path):
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on data: torch.export cannot trace it
                return x * 2
            return x

    with pytest.raises(ExportError, match="cannot handle this model"):
        export_model(DataDependent(), tmp_path / "out" / "m", input_shape=(3, 8, 8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", [a.family for a in ADAPTERS])
def test_every_adapter_export_builds_in_tensorrt_rtx(family, method, precision, tmp_root):
    """The same exports, built by TensorRT-RTX (a real TensorRT parser and builder) into an engine."""
    if __import__("importlib.util").util.find_spec("tensorrt_rtx_bindings") is None:
        pytest.skip("TensorRT-RTX is not installed: pip install 'edgetok[rtx]'")
    from test_rtx_build import build_rtx

    _, result = exported(family, method, tmp_root)
    build_rtx(result.output_dir, precision)
