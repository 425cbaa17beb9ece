"""Every export proven to build in a real TensorRT builder: TensorRT-RTX (TensorRT's ONNX
parser and Myelin compiler) builds an engine, ahead of time on this CPU-only machine, from
the exported graph of every registered method that exports and of every export family,
fp32 and fp16 (strongly typed: fp16 is an fp16-typed graph). The ViT adapter families x
tome/drop/dymu are built in tests/test_export.py from that module's exports; the image-
dependent methods (dymu, the dtd streaming step) are built with their real profiles (the
batch range of the config, every input of the graph). A graph the parser or builder
rejects is an exporter defect: nothing here is skipped for it."""
from __future__ import annotations

import functools
import importlib.util
import json

import pytest

import edgetok
from conftest import VIT_METHODS, tiny_vit, vit_method_model

# found, not imported: edgetok imports it after fixing the wheel's loader (edgetok/trt/pyplugins.py)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                                                   reason="TensorRT-RTX is not installed: pip install 'edgetok[rtx]'")]

PRECISIONS = ("fp32", "fp16")


@functools.lru_cache(maxsize=None)
def rtx_config(precision: str):
    from edgetok.config import load_config

    # one compute capability keeps the tests quick; the shipped config's list is built by test_cli_build
    return load_config("rtx").model_copy(update={"precision": precision, "compute_capabilities": (86,),
                                                 "batch": load_config("rtx").batch.model_copy(
                                                     update={"min": 1, "opt": 2, "max": 4})})


def build_rtx(export_dir, precision: str) -> dict:
    """Build ``export_dir`` with TensorRT-RTX; -> the engine manifest (asserting what every build must have)."""
    from edgetok.trt import build

    result = build(export_dir, rtx_config(precision), force=True)
    assert result.kind == "engine" and result.path.name == "engine.rtx.plan", result.message
    report = result.manifest["build"]
    assert report["engine_bytes"] == result.path.stat().st_size > 0 and report["layers"] > 0
    assert report["strongly_typed"] and report["cast"] == ("float16" if precision == "fp16" else None)
    on_disk = json.loads(result.path.with_suffix(".json").read_text())
    assert on_disk["build_key"] == result.manifest["build_key"] and on_disk["runtime"] == "tensorrt-rtx"
    return result.manifest


# -- every method on the reference family (timm) --------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("rtx")

    @functools.lru_cache(maxsize=None)
    def export(method: str):
        from edgetok.export.exporter import export_model

        model = vit_method_model(method)
        return export_model(model, root / method, model_name=method, parity_batches=[2], input_shape=(3, 32, 32)).output_dir

    return export


def test_every_vit_method_is_listed():
    """A newly registered ViT method must be added here (or to the family tests below)."""
    from edgetok.reduce.registry import get_method

    blocks = {name for name in edgetok.methods() if get_method(name).kind == "blocks"}
    assert blocks <= set(VIT_METHODS), f"add {sorted(blocks - set(VIT_METHODS))} to VIT_METHODS"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", sorted(VIT_METHODS))
def test_vit_method_builds(exports, method, precision):
    manifest = build_rtx(exports(method), precision)
    assert manifest["inputs"][0]["profile"]["max"][0] == 4


# -- the streaming DTD step: two inputs, a data-dependent count ----------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
def test_dtd_step_builds_with_both_inputs_profiled(tmp_path, precision):
    from edgetok.export import export_dtd_step

    res = export_dtd_step(tiny_vit(depth=2), tmp_path / "dtd", threshold=0.1)
    manifest = build_rtx(res.output_dir, precision)
    profiles = {i["name"]: i["profile"] for i in manifest["inputs"]}
    assert set(profiles) == {"pixel_values", "prev_tokens"}
    assert profiles["prev_tokens"]["min"] == [1, 17, 32] and profiles["prev_tokens"]["max"] == [4, 17, 32]


# -- the families outside the ViT adapters ----------------------------------------------------
T5 = ('hf:T5EncoderModel:{"vocab_size": 259, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, '
      '"num_heads": 4, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0}')
DETR = ('hf:DetrModel:{"backbone_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], '
        '"depths": [1, 1], "layer_type": "basic", "out_features": ["stage2"]}, "use_timm_backbone": false, '
        '"use_pretrained_backbone": false, "d_model": 32, "encoder_layers": 2, "decoder_layers": 1, '
        '"encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_queries": 10}')
DEFORMABLE_DETR = ('hf:DeformableDetrModel:{"backbone_config": {"model_type": "resnet", "embedding_size": 8, '
                   '"hidden_sizes": [8, 16, 16], "depths": [1, 1, 1], "layer_type": "basic", "out_features": '
                   '["stage1", "stage2", "stage3"]}, "use_timm_backbone": false, "use_pretrained_backbone": false, '
                   '"d_model": 32, "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 2, '
                   '"decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_queries": 5, '
                   '"num_feature_levels": 3, "encoder_n_points": 2, "decoder_n_points": 2}')
FAMILY_EXPORTS = {  # name -> (edgetok export arguments, export family)
    "detr-focus_detr": (["--model", DETR, "--method", "focus_detr", "--param", "keep_rate=0.5",
                         "--input-size", "64,64"], "hf-detr"),
    "deformable-detr-focus_detr": (["--model", DEFORMABLE_DETR, "--method", "focus_detr", "--param", "keep_rate=0.5",
                                    "--input-size", "64,64"], "hf-deformable-detr"),
    "t5-mrt5": (["--model", T5, "--method", "mrt5", "--param", "layer=0", "--param", "max_keep=16",
                 "--input-size", "32"], "hf-t5-encoder"),
    "dit-flexdit": (["--module", "edgetok.patch.dit:DiT", "--model-arg", "depth=2", "--model-arg", "hidden=32",
                     "--model-arg", "heads=2", "--method", "flexdit", "--param", "stages=[[0, 2]]"], "dit"),
}


@pytest.fixture(scope="module")
def family_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("rtx-families")

    @functools.lru_cache(maxsize=None)
    def export(name: str):
        from edgetok.cli import main

        args, _ = FAMILY_EXPORTS[name]
        out = root / name
        assert main(["export", *args, "-o", str(out)]) == 0
        return out

    return export


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", sorted(FAMILY_EXPORTS))
def test_family_builds(family_exports, name, precision):
    out = family_exports(name)
    manifest = build_rtx(out, precision)
    exported = json.loads((out / "manifest.json").read_text())
    assert exported["family"] == FAMILY_EXPORTS[name][1]
    assert [i["name"] for i in manifest["inputs"]] == [i["name"] for i in exported["inputs"]]
