import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/naive.py and helpers
torch.manual_seed(0)


def tiny_vit(**kw):
    """A small random-weight timm ViT (no downloads)."""
    import timm

    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    args.update(kw)
    name = args.pop("name", "vit_tiny_patch16_224")
    return timm.create_model(name, **args).eval()


# every ViT block method, with parameters for a 2-block, 17-token ViT (TensorRT-RTX and OpenVINO tests)
VIT_METHODS = {  # method -> params on a 2-block, 17-token ViT
    "none": None,
    "tome": dict(r=2),
    "drop": dict(keep_rate=0.6, fuse_dropped=True),
    "dymu": dict(threshold=0.2),
    "divprune": dict(keep_rate=0.5, layers=[0]),
    "hired": dict(keep_rate=0.5, layer=0),
    "zero_tprune": dict(r_importance=[2, 0], r_similarity=[2, 1], iterations=3),
    "diffrate": dict(prune=[2, 1], merge=[1, 2]),
    "slim": dict(keep_rate=0.5, layers=[0], dim=32),
    "mustdrop": dict(merge_r=3, merge_layer=0, keep_rate=0.5, drop_layers=[1]),
    "tail_drop": dict(keep_rate=0.5, layer=0),
    "vlm_output": dict(budget=5, scorer="divprune"),
}


def vit_method_model(method: str):
    """tiny_vit(depth=2), seeded, reduced by ``method`` with its VIT_METHODS parameters."""
    import torch

    import edgetok

    torch.manual_seed(0)
    model = tiny_vit(depth=2)
    return model if VIT_METHODS[method] is None else edgetok.apply(model, method, **VIT_METHODS[method])


@pytest.fixture
def vit():
    return tiny_vit()


def write_manifest(directory, **fields):
    """A complete manifest.json for a hand-made model.onnx in ``directory`` (tests that build
    graphs by hand): the fields given, the rest of an unreduced export, and the real sha256."""
    import hashlib
    from pathlib import Path

    from edgetok.runtime.artifacts import onnx_io
    from edgetok.runtime.manifest import MANIFEST_VERSION, Manifest

    d = Path(directory)
    inputs, outputs = onnx_io(d / "model.onnx")
    spec = lambda t: {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}  # noqa: E731
    base = dict(manifest_version=MANIFEST_VERSION, model="test", family=None, method="none", params={},
                adaptive=False, opset=17, edgetok_opset=None, target="portable", edgetok_ops=[], function_bodies=[],
                plugin_ops=[], input=spec(inputs[0]), inputs=[spec(t) for t in inputs],
                outputs=[spec(t) for t in outputs], tokens=None, flops=None, preprocessing=None, schedule=None,
                stream=None, batch_profile=None, config=None, parity=None, precision={"precision": "fp32"}, seed=None,
                sha256=hashlib.sha256((d / "model.onnx").read_bytes()).hexdigest(), versions={})
    Manifest(**(base | fields)).write(d)
