"""edgetok triton: the model repository's config.pbtxt parses as Triton's ModelConfig."""
import importlib.util
import json
from pathlib import Path

import onnx
import onnx.helper as h
import pytest
from conftest import write_manifest

from edgetok.cli import main
from edgetok.errors import EdgetokError


def _model_config_pb2():
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (pip install tritonclient): it carries Triton's model_config proto")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    s = importlib.util.spec_from_file_location("triton_model_config_pb2", path)  # without tritonclient.grpc's grpc import
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def _export(d, stripped=False):
    d.mkdir()
    x = h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])
    node = h.make_node("TokenDrop", ["images"], ["logits"], domain="edgetok") if stripped else h.make_node("Relu", ["images"], ["logits"])
    imports = [h.make_opsetid("", 17)] + ([h.make_opsetid("edgetok", 1)] if stripped else [])
    onnx.save(h.make_model(h.make_graph([node], "g", [x], [y]), opset_imports=imports), str(d / "model.onnx"))
    write_manifest(d, model="vit-tiny/tome", target="trt" if stripped else "portable")
    return d


def test_onnxruntime_repository_parses(tmp_path):
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    d = _export(tmp_path / "e")
    assert main(["triton", str(d), "--output", str(tmp_path / "repo"), "--max-batch-size", "16"]) == 0
    cfg = text_format.Parse((tmp_path / "repo" / "vit-tiny_tome" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert cfg.input[0].name == "images" and list(cfg.input[0].dims) == [3, 8, 8]
    assert cfg.input[0].data_type == pb2.TYPE_FP32 and cfg.output[0].name == "logits"
    assert cfg.HasField("dynamic_batching")
    assert (tmp_path / "repo" / "vit-tiny_tome" / "1" / "model.onnx").exists()


def test_tensorrt_repository_with_plugin(tmp_path):
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    d = _export(tmp_path / "e")
    (d / "engine.plan").write_bytes(b"engine bytes")
    (d / "engine.json").write_text(json.dumps({"tensorrt": "10.3.0", "needs_plugin": True, "inputs": [
        {"name": "images", "shape": ["batch", 3, 8, 8], "profile": {"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [4, 3, 8, 8]}}]}))
    lib = tmp_path / "libedgetok_trt_plugins.so"
    lib.write_bytes(b"\x7fELF")
    assert main(["triton", str(d), "--output", str(tmp_path / "repo"), "--backend", "tensorrt",
                 "--plugin-library", str(lib)]) == 0
    cfg = text_format.Parse((tmp_path / "repo" / "vit-tiny_tome" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 4  # from the engine's profile
    assert cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert (tmp_path / "repo" / "plugins" / lib.name).exists()
    assert "LD_PRELOAD=$PWD/plugins/" in (tmp_path / "repo" / "README.md").read_text()


def test_onnxruntime_refuses_stripped_export(tmp_path):
    from edgetok.serve.triton import write_repository

    d = _export(tmp_path / "e", stripped=True)
    with pytest.raises(EdgetokError, match="without function bodies"):
        write_repository(d, tmp_path / "repo")
    with pytest.raises(EdgetokError, match="no TensorRT engine"):
        write_repository(d, tmp_path / "repo", backend="tensorrt")
