"""Hugging Face adapters (ViT, CLIP, SigLIP, DINOv2, DINOv2 with registers) on
tiny random-weight models: no-reduction equality, reduced runs and token
accounting, per-layer decomposition against the original layer, shape
errors, and that apply() leaves the input model alone."""
from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

import edgetok
from edgetok.errors import EdgetokError, InputShapeError, UnsupportedModelError
from edgetok.patch import adapter_for

import transformers  # a hard dependency of edgetok

SMALL = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
)


def _vision(**extra):
    return {**SMALL, **extra}


@functools.lru_cache(maxsize=None)
def build(name: str):
    """A tiny random-weight model in eval mode (cached: building is the slow part)."""
    torch.manual_seed(0)
    t = transformers
    if name == "ViTModel":
        m = t.ViTModel(t.ViTConfig(**SMALL))
    elif name == "ViTForImageClassification":
        m = t.ViTForImageClassification(t.ViTConfig(**SMALL, num_labels=5))
    elif name == "CLIPVisionModel":
        m = t.CLIPVisionModel(t.CLIPVisionConfig(**SMALL))
    elif name == "CLIPVisionModelWithProjection":
        m = t.CLIPVisionModelWithProjection(t.CLIPVisionConfig(**SMALL, projection_dim=16))
    elif name == "CLIPForImageClassification":
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
        m = t.CLIPForImageClassification(t.CLIPConfig(vision_config=_vision(), text_config=text, num_labels=5))
    elif name == "SiglipVisionModel":
        m = t.SiglipVisionModel(t.SiglipVisionConfig(**SMALL))
    elif name == "SiglipForImageClassification":
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
        m = t.SiglipForImageClassification(t.SiglipConfig(vision_config=_vision(), text_config=text, num_labels=5))
    elif name.startswith("Dinov2"):
        cfg = dict(SMALL, mlp_ratio=2, layerscale_value=0.5)
        del cfg["intermediate_size"]
        if "Registers" in name:
            cfg = t.Dinov2WithRegistersConfig(**cfg, num_register_tokens=2, num_labels=5)
        else:
            cfg = t.Dinov2Config(**cfg, num_labels=5, use_swiglu_ffn=name.endswith("SwiGLU"))
        m = getattr(t, name.removesuffix("SwiGLU"))(cfg)
    else:
        raise KeyError(name)
    return m.eval()


MODELS = [
    "ViTModel",
    "ViTForImageClassification",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPForImageClassification",
    "SiglipVisionModel",
    "SiglipForImageClassification",
    "Dinov2Model",
    "Dinov2ModelSwiGLU",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
]
PREFIX = {"Siglip": 0, "Dinov2WithRegisters": 3}


def prefix(name: str) -> int:
    return next((v for k, v in PREFIX.items() if name.startswith(k)), 1)


def images(b=2, size=32, seed=1):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tensors(out) -> dict:
    """Every tensor of a ModelOutput (or a tuple) by name."""
    if isinstance(out, tuple):
        return {str(i): v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def assert_same(a, b, tol=1e-5):
    ta, tb = tensors(a), tensors(b)
    assert type(a) is type(b) and ta.keys() == tb.keys() and ta
    for k in ta:
        assert ta[k].shape == tb[k].shape, k
        err = (ta[k] - tb[k]).abs().max().item()
        assert err <= tol, f"{k}: max abs err {err}"


REDUCTIONS = [("tome", {"r": 3}), ("drop", {"keep_rate": 0.5}), ("drop", {"r": 2, "fuse_dropped": True})]
NO_REDUCTION = [("tome", {"r": 0}), ("drop", {"r": 0}), ("dymu", {"threshold": 1.0}), ("dymu", {"threshold": 1.5})]


@pytest.mark.parametrize("name", MODELS)
def test_no_reduction_equals_original(name):
    model, x = build(name), images()
    with torch.no_grad():
        ref = model(pixel_values=x)
        for method, params in NO_REDUCTION:
            assert_same(edgetok.apply(model, method, **params)(pixel_values=x), ref)


@pytest.mark.parametrize("name", MODELS)
def test_reduced_runs_and_counts_match_flops(name):
    model, x = build(name), images()
    info = adapter_for(model).info(model)
    assert info.num_prefix == prefix(name) and info.tokens == prefix(name) + 16
    with torch.no_grad():
        ref = model(pixel_values=x)
        for method, params in REDUCTIONS:
            reduced = edgetok.apply(model, method, **params)
            out = reduced(pixel_values=x)
            for k, v in tensors(out).items():
                assert torch.isfinite(v).all(), k
                if k != "last_hidden_state":  # pooled outputs keep their shape
                    assert v.shape == tensors(ref)[k].shape, k
            counts = edgetok.token_counts(reduced, x)
            assert counts == edgetok.flops(reduced, (3, 32, 32)).tokens
            assert counts[-1] < counts[0]
            if "last_hidden_state" in tensors(out):
                assert out.last_hidden_state.shape[1] == counts[-1]
        dymu = edgetok.apply(model, "dymu", threshold=0.3)
        counts = edgetok.token_counts(dymu, x)
        assert counts == edgetok.flops(dymu, inputs=x).tokens
        assert all(torch.isfinite(v).all() for v in tensors(dymu(pixel_values=x)).values())


def _naive_attention(q, k, v, scale):
    return ((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v


@pytest.mark.parametrize("name", ["ViTModel", "CLIPVisionModel", "SiglipVisionModel", "Dinov2Model",
                                  "Dinov2ModelSwiGLU", "Dinov2WithRegistersModel"])
def test_layer_hooks_reproduce_original_layer(name):
    """qkv -> softmax attention -> attn_delta -> mlp_delta, composed by hand,
    must give what the model's own layer forward gives."""
    model = build(name)
    adapter = adapter_for(model)
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in adapter.blocks(model):
            q, k, v = adapter.qkv(layer, x)
            assert q.shape == (2, 4, 17, 16)
            o = _naive_attention(q, k, v, adapter.scale(layer)).transpose(1, 2).reshape(2, 17, 64)
            h = x + adapter.attn_delta(layer, o)
            mine = h + adapter.mlp_delta(layer, h)
            theirs = layer(x, None)
            assert (mine - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["SiglipVisionModel", "SiglipForImageClassification",
                                  "Dinov2ForImageClassification", "CLIPForImageClassification"])
def test_adaptive_padding_does_not_leak(name):
    """DyMU pads images with fewer tokens; the pooled output of an image must
    not depend on the other images in its batch (padding masked in the SigLIP
    attention-pooling head and in the size-weighted means)."""
    model = build(name)
    x = images(3, seed=5)
    x[0] = 0.05 * x[0] + 1.0  # a nearly flat image merges more than noise does
    reduced = edgetok.apply(model, "dymu", threshold=0.2)
    with torch.no_grad():
        alone = [edgetok.token_counts(reduced, x[i : i + 1])[-1] for i in range(3)]
        assert len(set(alone)) > 1, f"test needs differing token counts, got {alone}"
        batch = tensors(reduced(pixel_values=x))
        key = "logits" if "logits" in batch else "pooler_output"
        for i in range(3):
            single = tensors(reduced(pixel_values=x[i : i + 1]))[key]
            assert (batch[key][i] - single[0]).abs().max().item() <= 1e-5


def test_siglip_head_uses_sizes():
    """Proportional attention in the pooling head: a token standing for s
    patches weighs like s copies of it; with all sizes 1 the head is unchanged."""
    model = build("SiglipVisionModel")
    adapter = adapter_for(model)
    tome = edgetok.apply(model, "tome", r=1)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    size = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0]).expand(2, 5)[..., None]
    copies = x.repeat_interleave(size[0, :, 0].long(), dim=1)
    with torch.no_grad():
        assert (adapter.pool(tome, model.head, x, torch.ones(2, 5, 1)) - model.head(x)).abs().max() <= 1e-5
        assert (adapter.pool(tome, model.head, x, size) - model.head(copies)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["ViTModel", "CLIPVisionModel", "SiglipVisionModel", "Dinov2Model"])
def test_wrong_input_shape(name):
    reduced = edgetok.apply(build(name), "tome", r=2)
    bad = [torch.randn(1, 1, 32, 32), torch.randn(3, 32, 32), torch.randn(1, 3, 30, 30)]
    if not name.startswith("Dinov2"):  # DINOv2 interpolates position embeddings: any multiple of the patch
        bad.append(torch.randn(1, 3, 40, 40))
    for x in bad:
        with pytest.raises(InputShapeError):
            reduced(pixel_values=x)
    with pytest.raises(InputShapeError):
        edgetok.flops(reduced, (3, 64, 64))


@pytest.mark.parametrize("name", ["ViTForImageClassification", "SiglipVisionModel", "Dinov2WithRegistersModel"])
def test_apply_leaves_original_alone(name):
    model, x = build(name), images()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model)
    with torch.no_grad():
        before = model(pixel_values=x)
        reduced = edgetok.apply(model, "tome", r=3)
        reduced(pixel_values=x)
        after = model(pixel_values=x)
    assert type(model) is cls and not hasattr(model, "edgetok_plan")
    assert not any(hasattr(m, "token_reducer") for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert_same(after, before, tol=0)
    assert reduced.state_dict().keys() == model.state_dict().keys()


def test_forward_keywords():
    model, x = build("ViTForImageClassification"), images()
    reduced = edgetok.apply(model, "tome", r=0)
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        assert_same(reduced(pixel_values=x, labels=labels), model(pixel_values=x, labels=labels))
        assert_same(reduced(x, return_dict=False), model(x, return_dict=False))
        big = images(size=48)
        assert_same(
            reduced(pixel_values=big, interpolate_pos_encoding=True),
            model(pixel_values=big, interpolate_pos_encoding=True),
        )
    for bad in ({"output_attentions": True}, {"output_hidden_states": True}, {"attention_mask": torch.ones(2, 17)}):
        with pytest.raises(EdgetokError, match=next(iter(bad))):
            reduced(pixel_values=x, **bad)
    with pytest.raises(TypeError, match="unexpected"):
        reduced(pixel_values=x, nonsense=1)
    with pytest.raises(TypeError, match="labels"):
        edgetok.apply(build("ViTModel"), "tome", r=1)(pixel_values=x, labels=labels)


def test_unsupported_hf_models():
    t = transformers
    masked = t.ViTForMaskedImageModeling(t.ViTConfig(**SMALL, encoder_stride=8))
    with pytest.raises(UnsupportedModelError, match="Supported families"):
        edgetok.apply(masked, "tome", r=1)
    odd = build("ViTModel")
    odd = type(odd)(odd.config)
    odd.layers[1] = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="ViTLayer"):
        edgetok.apply(odd, "tome", r=1)


def test_adapter_modules_do_not_import_libraries():
    code = (
        "import sys, edgetok, edgetok.patch.hf_vit, edgetok.patch.hf_clip, edgetok.patch.hf_siglip, "
        "edgetok.patch.hf_dinov2, edgetok.patch.torchvision_vit\n"
        "bad = [m for m in ('transformers', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
