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
