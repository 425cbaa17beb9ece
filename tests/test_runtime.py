"""edgetok.runtime: sessions on ORT CPU vs torch, preprocessing, errors, streaming DTD."""

import numpy as np
import pytest
from conftest import write_manifest
import torch

import edgetok.runtime as rt
from edgetok.errors import InputShapeError


class Features(torch.nn.Module):
    """Token output [B,N,C] of a ViT encoder (what a StreamSession consumes)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit.forward_features(x)


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          num_classes=7).eval()
    d = tmp_path_factory.mktemp("vit")
    torch.onnx.export(m, (torch.randn(1, 3, 32, 32),), str(d / "model.onnx"), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False, opset_version=17)
    write_manifest(d, model="tiny", preprocessing={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                                   "size": [32, 32], "interpolation": "bilinear"})
    torch.save(m, d / "model.pt")
    return d, m


def test_ort_cpu_matches_torch(vit_export):
    d, m = vit_export
    sess = rt.load(d, backend="ort-cpu", preprocess=False)
    x = torch.randn(3, 3, 32, 32)
    out = sess(x)
    assert np.abs(out - m(x).detach().numpy()).max() < 1e-4
    # best available here is ORT CPU (no engine, no CUDA provider); the torch backend gives the same
    assert rt.load(d).backend in ("ort-cpu", "ort-cuda")
    ref = rt.load(d, backend="torch", preprocess=False)
    assert np.abs(ref(x) - out).max() < 1e-4


def test_preprocessing_from_manifest(vit_export):
    d, m = vit_export
    sess = rt.load(d, backend="ort-cpu")
    photo = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)  # HWC uint8, other size
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    want = m((x - 0.5) / 0.25).detach().numpy()
    assert np.abs(sess(photo) - want).max() < 1e-4
    assert np.abs(sess(torch.from_numpy(photo)) - want).max() < 1e-4  # torch in, numpy out


def test_bad_inputs(vit_export, tmp_path):
    d, _ = vit_export
    with pytest.raises(InputShapeError, match="model takes 32x32"):
        rt.load(d, resize=False)(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(InputShapeError, match=r"must have shape \['batch', 3, 32, 32\]"):
        rt.load(d, preprocess=False)(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(InputShapeError, match="3-channel"):
        rt.load(d)(np.zeros((1, 5, 32, 32), np.float32))
    # trt here: TensorRT missing (or, where it is installed, no engine in the dir) -> a reason, not a crash
    with pytest.raises(rt.BackendError, match="TensorRT is not installed|no CUDA GPU|has no engine"):
        rt.load(d, backend="trt")
    with pytest.raises(rt.ArtifactError, match="unknown file type"):
        (tmp_path / "x.bin").write_bytes(b"")
        rt.load(tmp_path / "x.bin")


@pytest.fixture(scope="module")
def token_export(vit_export, tmp_path_factory):
    _, m = vit_export
    d = tmp_path_factory.mktemp("tokens")
    torch.onnx.export(Features(m), (torch.randn(1, 3, 32, 32),), str(d / "model.onnx"), input_names=["images"],
                      output_names=["tokens"], dynamo=False, opset_version=17)
    return d


def test_stream_session_static_then_change(token_export):
    sess = rt.StreamSession(rt.load(token_export, backend="ort-cpu"), threshold=0.01, protect_first=1)
    rng = np.random.default_rng(0)
    scene = rng.random((32, 32, 3)).astype(np.float32)
    moved = scene.copy()
    moved[:16, :16] = rng.random((16, 16, 3))  # something changes in one quadrant
    results = list(sess.run([scene, scene, scene, moved, moved]))
    kept = sess.kept_per_frame
    total = results[0].total
    assert kept[0] == total  # first frame keeps everything
    assert kept[1] == kept[2] == 1  # static scene: only the protected class token
    assert kept[3] > kept[2] and kept[4] == 1  # rises on change, drops once static again
    r = results[3]
    assert r.tokens.shape == (r.kept, 192) and r.positions[0] == 0 and (np.diff(r.positions) > 0).all()


def test_stream_session_needs_tokens(vit_export):
    d, _ = vit_export
    with pytest.raises(Exception, match=r"needs tokens \[1, N, C\]"):
        rt.StreamSession(rt.load(d, backend="ort-cpu")).step(np.zeros((32, 32, 3), np.float32))
