"""Tail drop (One-D-Piece/TiTok), Focus-DETR, MrT5, FlexDiT: equality with the
unreduced model where the method should be a no-op, naive references (fp32,
max abs err <= 1e-5), ONNX export + ORT CPU parity (1e-4), and errors."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import naive_methods_other as naive
from conftest import tiny_vit

import edgetok
from edgetok.errors import ScheduleError, UnsupportedModelError
from edgetok.patch.dit import at_factor, flexdit as flexdit_model
from edgetok.patch.focus_detr import focus_detr as focus_detr_model
from edgetok.patch.hf_t5 import mrt5 as mrt5_model
from edgetok.reduce import focus_detr, mrt5

importlib.import_module("edgetok.reduce.methods")  # registers the built-in methods
TOL = 1e-5


def export_ort(model, args):
    """Export with the edgetok ONNX ops (dynamo exporter + op bodies), run in ORT CPU."""
    import onnx
    import onnxruntime as ort

    from edgetok.ops import onnx as eo

    prog = torch.onnx.export(model, args, dynamo=True, custom_translation_table=eo.custom_translation_table(),
                             opset_version=18, verbose=False)
    proto = eo.add_functions(prog.model_proto)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    return outs, [n.op_type for n in proto.graph.node if n.domain == "edgetok"]


class Outputs(torch.nn.Module):
    """Wraps a model so the exporter sees plain tensor outputs."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(self.model, *args)


# -- tail drop ---------------------------------------------------------------
def test_tail_drop_matches_naive_and_counts():
    vit = tiny_vit(depth=3)
    x = torch.randn(2, 3, 32, 32)
    red = edgetok.apply(vit, "tail_drop", keep=6, layer=1)
    with torch.no_grad():
        err = (red(x) - naive.tail_drop_vit(vit, x, 1, 6)).abs().max()
    assert err <= TOL
    assert edgetok.token_counts(red, x) == [17, 17, 6, 6]
    assert edgetok.flops(red).ratio_to(edgetok.flops(vit)) > 1.0


def test_tail_drop_keep_all_is_identity_and_errors():
    vit = tiny_vit(depth=2)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(edgetok.apply(vit, "tail_drop", keep=17)(x), vit(x))
    with pytest.raises(ScheduleError, match="cannot keep 18 of 17"):
        edgetok.apply(vit, "tail_drop", keep=18)
    with pytest.raises(ScheduleError, match="exactly one of"):
        edgetok.apply(vit, "tail_drop")
    with pytest.raises(ScheduleError, match="outside the model"):
        edgetok.apply(vit, "tail_drop", keep=4, layer=5)


def test_tail_drop_exports():
    vit = tiny_vit(depth=2)
    red = edgetok.apply(vit, "tail_drop", keep_rate=0.5, layer=0)
    x = torch.randn(1, 3, 32, 32)
    (out,), ops = export_ort(red, (x,))
    with torch.no_grad():
        assert np.abs(out - red(x).numpy()).max() <= 1e-4
    assert ops == ["TokenDrop"]


# -- Focus-DETR --------------------------------------------------------------
@pytest.fixture(scope="module")
def detr():
    from transformers import DetrConfig, DetrModel, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                            out_features=["stage2"])
    cfg = DetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=32,
                     encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5)
    return DetrModel(cfg).eval()


def test_focus_detr_keep_all_equals_model(detr):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = detr(pixel_values=x), focus_detr_model(detr, keep_rate=1.0)(pixel_values=x)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= TOL
    assert (a.encoder_last_hidden_state - b.encoder_last_hidden_state).abs().max() <= TOL


def test_focus_detr_matches_naive_with_padding(detr):
    x = torch.randn(2, 3, 64, 96)
    pm = torch.ones(2, 64, 96, dtype=torch.long)
    pm[1, :, 64:] = 0  # second image padded on the right
    red = focus_detr_model(detr, keep_rate=[0.5, 0.25])
    seen = {}
    enc = red.encoder
    enc.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs=kwargs, out=out), with_kwargs=True)
    with torch.no_grad():
        red(pixel_values=x, pixel_mask=pm)
        kw = seen["kwargs"]
        n = kw["inputs_embeds"].shape[1]
        ref = naive.focus_detr_encoder(enc, enc.focus_scorer.mlp, kw["inputs_embeds"],
                                       kw["spatial_position_embeddings"], kw["attention_mask"],
                                       [focus_detr.keep_count(n, 0.5), focus_detr.keep_count(n, 0.25)])
    assert (seen["out"].last_hidden_state - ref).abs().max() <= TOL


def test_focus_detr_exports_and_scorer_file(detr, tmp_path):
    scorer = focus_detr.ForegroundScorer(32, seed=3)
    path = tmp_path / "scorer.pt"
    torch.save(scorer.state_dict(), path)
    red = focus_detr_model(detr, keep_rate=[0.5, 0.3], scorer_path=str(path))
    assert torch.equal(red.encoder.focus_scorer.mlp[0].weight, scorer.mlp[0].weight)
    x = torch.randn(1, 3, 64, 96)
    wrapped = Outputs(red, lambda m, px: m(pixel_values=px).last_hidden_state).eval()
    (out,), ops = export_ort(wrapped, (x,))
    with torch.no_grad():
        assert np.abs(out - wrapped(x).numpy()).max() <= 1e-4
    assert ops == ["TokenDrop", "TokenDrop"]
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face DETR"):
        focus_detr_model(tiny_vit())
    with pytest.raises(ScheduleError, match=r"must be in \(0, 1\]"):
        focus_detr_model(detr, keep_rate=0.0)


# -- Focus-DETR on Deformable-DETR (multi-scale) -----------------------------------
@pytest.fixture(scope="module")
def deformable_detr():
    from transformers import DeformableDetrConfig, DeformableDetrModel, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 1, 1], layer_type="basic",
                            out_features=["stage1", "stage2", "stage3"])
    cfg = DeformableDetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                               d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5,
                               num_feature_levels=3, encoder_n_points=2, decoder_n_points=2)
    return DeformableDetrModel(cfg).eval()


def padded_images():
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    pm = torch.ones(2, 64, 96, dtype=torch.long)
    pm[1, :, 64:] = 0  # second image padded on the right
    return x, pm


def test_focus_deformable_detr_keep_all_equals_model(deformable_detr):
    x, pm = padded_images()
    with torch.no_grad():
        a = deformable_detr(pixel_values=x, pixel_mask=pm)
        b = focus_detr_model(deformable_detr, keep_rate=1.0)(pixel_values=x, pixel_mask=pm)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= TOL
    assert (a.encoder_last_hidden_state - b.encoder_last_hidden_state).abs().max() <= TOL


def test_focus_deformable_detr_matches_naive_with_padding(deformable_detr):
    x, pm = padded_images()
    red = focus_detr_model(deformable_detr, keep_rate=[0.5, 0.25], seed=4)
    enc = red.encoder
    assert enc.focus_scorer.levels == 3 and enc.focus_scorer.alpha.abs().min() > 0
    seen = {}
    enc.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs=kwargs, out=out), with_kwargs=True)
    with torch.no_grad():
        full = deformable_detr(pixel_values=x, pixel_mask=pm).encoder_last_hidden_state
        red(pixel_values=x, pixel_mask=pm)
        n = seen["kwargs"]["inputs_embeds"].shape[1]
        ref = naive.focus_deformable_detr_encoder(enc, enc.focus_scorer, seen["kwargs"],
                                                  [focus_detr.keep_count(n, 0.5), focus_detr.keep_count(n, 0.25)])
    out = seen["out"].last_hidden_state
    assert (out - ref).abs().max() <= TOL
    assert (out - full).abs().max() > 0.1  # the reduction did change the tokens it skipped


def test_focus_deformable_detr_exports_and_scorer_levels(deformable_detr, tmp_path):
    scorer = focus_detr.ForegroundScorer(32, seed=3, levels=3)
    path = tmp_path / "scorer.pt"
    torch.save(scorer.state_dict(), path)
    red = focus_detr_model(deformable_detr, keep_rate=0.4, scorer_path=str(path))
    assert torch.equal(red.encoder.focus_scorer.alpha, scorer.alpha)
    x = torch.randn(1, 3, 64, 96)
    wrapped = Outputs(red, lambda m, px: m(pixel_values=px).encoder_last_hidden_state).eval()
    (out,), ops = export_ort(wrapped, (x,))
    with torch.no_grad():
        assert np.abs(out - wrapped(x).numpy()).max() <= 1e-4
    assert ops == ["TokenDrop", "TokenDrop"]
    with pytest.raises(ScheduleError, match="the model has 3"):
        focus_detr_model(deformable_detr, scorer=focus_detr.ForegroundScorer(32))
    torch.save(focus_detr.ForegroundScorer(32).state_dict(), path)
    with pytest.raises(ScheduleError, match="does not fit a scorer of width 32 and 3 feature level"):
        focus_detr_model(deformable_detr, scorer_path=str(path))


# -- MrT5 ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=259, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu")
    return T5EncoderModel(cfg).eval()


def byte_batch():
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return ids, mask


def test_mrt5_gate_keeping_everything_equals_model(t5):
    ids, mask = byte_batch()
    red = mrt5_model(t5, layer=1, max_keep=12)
    with torch.no_grad():
        red.encoder.mrt5_steps[0].gate.proj.bias.fill_(-50.0)  # sigmoid ~ 0: no token deleted
        a = t5(input_ids=ids, attention_mask=mask).last_hidden_state
        b = red(input_ids=ids, attention_mask=mask)
    assert torch.equal(b.attention_mask, mask)
    valid = mask.bool()
    assert (a[valid] - b.last_hidden_state[valid]).abs().max() <= TOL


@pytest.mark.parametrize("max_keep", [None, 10])
def test_mrt5_matches_naive_hard_deletion(t5, max_keep):
    ids, mask = byte_batch()
    red = mrt5_model(t5, layer=1, max_keep=max_keep)
    gate = red.encoder.mrt5_steps[0].gate
    with torch.no_grad():
        out = red(input_ids=ids, attention_mask=mask)
        ref = naive.mrt5_encoder(t5, ids, mask, 1, gate.norm, gate.proj, gate.scale)
    for b, r in enumerate(ref):
        got = out.last_hidden_state[b][out.attention_mask[b].bool()]
        assert got.shape == r.shape and 0 < r.shape[0] < int(mask[b].sum())
        assert (got - r).abs().max() <= TOL
    if max_keep is None:
        assert out.last_hidden_state.shape[1] == max(r.shape[0] for r in ref)


def test_mrt5_exports_gate_file_and_errors(t5, tmp_path):
    ids, mask = byte_batch()
    gate = mrt5.DeleteGate(32, seed=5)
    torch.save(gate.state_dict(), tmp_path / "gate.pt")
    red = mrt5_model(t5, layer=1, max_keep=6, gate_path=str(tmp_path / "gate.pt"))
    assert torch.equal(red.encoder.mrt5_steps[0].gate.proj.weight, gate.proj.weight)
    wrapped = Outputs(red, lambda m, i, a: tuple(m(input_ids=i, attention_mask=a).values())[-3:]).eval()
    outs, ops = export_ort(wrapped, (ids, mask))
    with torch.no_grad():
        ref = wrapped(ids, mask)
    assert np.abs(outs[0] - ref[0].numpy()).max() <= 1e-4
    assert all(np.array_equal(o, r.numpy()) for o, r in zip(outs[1:], ref[1:]))
    assert ops == ["TokenDrop"]
    with pytest.raises(ScheduleError, match="below the last"):
        mrt5_model(t5, layer=2)
    with pytest.raises(ScheduleError, match="max_keep=13"):
        mrt5_model(t5, layer=0, max_keep=13)(input_ids=ids)


# -- FlexDiT -------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit():
    from edgetok.patch.dit import DiT

    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, hidden=32, depth=4, heads=2).eval()


def dit_inputs(t: int):
    return torch.randn(2, 4, 8, 8), torch.full((2,), t), torch.tensor([1, 3])


def test_flexdit_dense_stage_equals_model_and_sparse_matches_naive(dit):
    red = flexdit_model(dit, sparse_layers=(1, 3), stages=((500, 2), (0, 1)))
    x, t, y = dit_inputs(100)
    with torch.no_grad():
        assert torch.equal(red(x, t, y), dit(x, t, y))  # late timestep: factor 1, dense
        x, t, y = dit_inputs(800)
        err = (red(x, t, y) - naive.flexdit(dit, x, t, y, 1, 3, 2)).abs().max()
    assert err <= TOL


def test_flexdit_fixed_factor_exports_and_errors(dit):
    red = flexdit_model(dit)
    fixed = at_factor(red, 2)
    x, t, y = dit_inputs(10)
    (out,), _ = export_ort(fixed, (x, t, y))
    with torch.no_grad():
        assert np.abs(out - fixed(x, t, y).numpy()).max() <= 1e-4
    with pytest.raises(ScheduleError, match="one timestep per batch"):
        red(x, torch.tensor([10, 900]), y)
    with pytest.raises(ScheduleError, match="must divide"):
        flexdit_model(dit, stages=((0, 3),))
    with pytest.raises(ScheduleError, match="t_from=0"):
        flexdit_model(dit, stages=((500, 2),))
