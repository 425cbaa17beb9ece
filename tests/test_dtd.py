"""DTD clip and streaming forms on a tiny ViT."""
import pytest
import torch

import edgetok
from edgetok.errors import ScheduleError

from conftest import tiny_vit


def frames(t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 3, 32, 32, generator=g)
    return base.repeat(t, 1, 1, 1)


def test_static_clip_keeps_only_class_token_after_first_frame():
    model = tiny_vit()
    out = edgetok.apply(model, "dtd", threshold=0.01)(frames())
    assert out.kept_per_frame.tolist() == [17, 1, 1, 1]
    assert out.tokens.shape == (20, 32)
    assert out.frame_index.tolist() == [0] * 17 + [1, 2, 3]


def test_threshold_zero_keeps_everything_and_matches_encoder():
    model = tiny_vit()
    f = frames() + 0.1 * torch.randn(4, 3, 32, 32)
    out = edgetok.apply(model, "dtd", threshold=0.0)(f)
    assert out.kept_per_frame.tolist() == [17] * 4
    tokens, _ = edgetok.apply(model, "tome", r=0).forward_tokens(f)
    assert torch.allclose(out.tokens, tokens.reshape(-1, 32), atol=1e-6)


@pytest.mark.parametrize("mode", ["feature", "pixel"])
def test_stream_equals_clip(mode):
    model = tiny_vit()
    f = frames(5)
    f[2, :, :8, :8] += 2.0  # one patch changes at frame 2, back at frame 3
    clip = edgetok.apply(model, "dtd", threshold=0.05, mode=mode)(f)
    stream = edgetok.apply(model, "dtd", threshold=0.05, mode=mode, streaming=True)
    counts = [int(stream(f[i : i + 1])[2]) for i in range(5)]
    assert counts == clip.kept_per_frame.tolist()
    assert counts[0] == 17 and counts[1] == 1 and counts[2] > 1 and counts[3] > 1


def test_stream_reset_and_shape_change():
    stream = edgetok.apply(tiny_vit(), "dtd", threshold=0.05, streaming=True)
    f = frames(2)
    stream(f[:1])
    with pytest.raises(ScheduleError, match="call reset"):
        stream(f)
    stream.reset()
    assert int(stream(f)[2][0]) == 17


def test_bad_dtd_arguments():
    with pytest.raises(ScheduleError, match="threshold"):
        edgetok.apply(tiny_vit(), "dtd", threshold=-1)
    with pytest.raises(ScheduleError, match="mode"):
        edgetok.apply(tiny_vit(), "dtd", mode="optical-flow")
