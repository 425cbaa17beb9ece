"""torchvision VisionTransformer adapter on tiny random-weight models:
no-reduction equality, reduced runs and token accounting, per-block
decomposition against EncoderBlock, shape errors, input model untouched."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import edgetok
from edgetok.errors import InputShapeError, UnsupportedModelError
from edgetok.patch import adapter_for

import torchvision.models.vision_transformer as vt  # a hard dependency of edgetok


@functools.lru_cache(maxsize=None)
def build(representation_size=None):
    torch.manual_seed(0)
    m = vt.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
        num_classes=5, representation_size=representation_size,
    )
    nn.init.normal_(m.heads.head.weight)  # torchvision zero-initialises the head: outputs would all be 0
    nn.init.normal_(m.class_token)
    return m.eval()


def images(b=2, size=32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_err(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("rep", [None, 16])
def test_no_reduction_equals_original(rep):
    model, x = build(rep), images()
    with torch.no_grad():
        ref = model(x)
        assert ref.abs().max() > 0
        for method, params in [("tome", {"r": 0}), ("drop", {"r": 0}), ("dymu", {"threshold": 1.0})]:
            assert max_err(edgetok.apply(model, method, **params)(x), ref) <= 1e-5


def test_info():
    info = adapter_for(build()).info(build())
    assert (info.family, info.depth, info.dim, info.heads, info.head_dim, info.num_prefix, info.tokens) == (
        "torchvision-vit", 2, 64, 4, 16, 1, 17
    )
    assert info.attn_weights == 4 * 64 * 64 and info.mlp_weights == 2 * 64 * 128


def test_reduced_runs_and_counts_match_flops():
    model, x = build(), images()
    with torch.no_grad():
        reductions = [("tome", {"r": 3}), ("drop", {"keep_rate": 0.5}), ("drop", {"r": 2, "fuse_dropped": True})]
        for method, params in reductions:
            reduced = edgetok.apply(model, method, **params)
            out = reduced(x)
            assert out.shape == (2, 5) and torch.isfinite(out).all()
            counts = edgetok.token_counts(reduced, x)
            assert counts == edgetok.flops(reduced, (3, 32, 32)).tokens and counts[-1] < counts[0]
            tokens, size = reduced.forward_tokens(x)
            assert tokens.shape[1] == counts[-1]
            if method == "tome" or params.get("fuse_dropped"):  # merging and fusing keep every patch counted
                assert torch.equal(size.sum(1), torch.full((2, 1), 17.0))
        dymu = edgetok.apply(model, "dymu", threshold=0.3)
        assert edgetok.token_counts(dymu, x) == edgetok.flops(dymu, inputs=x).tokens
        assert torch.isfinite(dymu(x)).all()


def test_block_hooks_reproduce_encoder_block():
    """qkv (from in_proj_weight/in_proj_bias) -> softmax attention -> out_proj ->
    MLP, composed by hand, must give what EncoderBlock.forward gives."""
    model = build()
    adapter = adapter_for(model)
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for block in adapter.blocks(model):
            q, k, v = adapter.qkv(block, x)
            attn = ((q @ k.transpose(-1, -2)) * adapter.scale(block)).softmax(-1)
            h = x + adapter.attn_delta(block, (attn @ v).transpose(1, 2).reshape(2, 17, 64))
            assert max_err(h + adapter.mlp_delta(block, h), block(x)) <= 1e-5


def test_wrong_input_shape():
    reduced = edgetok.apply(build(), "tome", r=2)
    for x in (torch.randn(1, 1, 32, 32), torch.randn(3, 32, 32), torch.randn(1, 3, 48, 48)):
        with pytest.raises(InputShapeError):
            reduced(x)


def test_apply_leaves_original_alone():
    model, x = build(), images()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
        edgetok.apply(model, "drop", keep_rate=0.5)(x)
        after = model(x)
    assert type(model) is vt.VisionTransformer and not hasattr(model, "edgetok_plan")
    assert not any(hasattr(m, "token_reducer") for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(before, after)


def test_unsupported_attention_variant():
    model = copy.deepcopy(build())
    model.encoder.layers[1].self_attention.add_zero_attn = True
    with pytest.raises(UnsupportedModelError, match="add_zero_attn"):
        edgetok.apply(model, "tome", r=1)
