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
