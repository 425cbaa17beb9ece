"""Fidelity metrics: cosine of features, k-NN agreement, the labelled photo set,
and the merge map (which patches went into which token)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import timm
import torch

import edgetok
from edgetok.validate import fidelity as F

HAS_DATA = importlib.util.find_spec("skimage") is not None


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3).eval()


def test_knn_predict_majority_and_nearest_tie_break():
    feats = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9], [1.0, 0.05], [0.05, 1.0], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 1])
    gallery = torch.tensor([True, True, True, True, False, False, False])
    assert F.knn_predict(feats, labels, gallery, k=3).tolist() == [0, 1, 0]  # last: votes 0, 0, 1
    tie = F.knn_predict(torch.tensor([[1.0, 0], [0, 1.0], [0.6, 0.8]]), torch.tensor([0, 1, 0]),
                        torch.tensor([True, True, False]), k=2)
    assert tie.tolist() == [1]  # one vote each: the nearest gallery row decides


def test_identical_model_gives_perfect_scores_and_reduction_lowers_them(vit):
    torch.manual_seed(1)
    data = F.LabelledSet(torch.randn(8, 3, 64, 64), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), list("abcd"),
                         torch.tensor([True, False] * 4))
    same = F.fidelity(vit, edgetok.apply(vit, "tome", r=0), data)
    assert same.cls_cosine_min == pytest.approx(1.0, abs=1e-5) and same.pooled_cosine_min == pytest.approx(1.0, abs=1e-5)
    assert same.knn_agreement == 1.0 and same.knn_accuracy_base == same.knn_accuracy_reduced
    red = F.fidelity(vit, edgetok.apply(vit, "tome", r=4), data)
    assert red.pooled_cosine_mean < 0.99999 and -1 <= red.pooled_cosine_min <= red.pooled_cosine_mean <= 1
    assert red.images == 8


def test_pooled_features_are_size_weighted(vit):
    """With r=0 merging nothing the pooled feature is the plain mean of patch tokens."""
    x = torch.randn(2, 3, 64, 64)
    cls, pooled = F.features(vit, x)
    tokens = vit.forward_features(x)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(pooled, tokens[:, 1:].mean(1))


def test_token_groups_tome_partition_and_drop(vit):
    x = torch.randn(2, 3, 64, 64)
    plain = F.token_groups(edgetok.apply(vit, "tome", r=0), x)
    assert plain.tolist() == [list(range(1, 17))] * 2  # every patch its own token (after the class token)
    merged = edgetok.apply(vit, "tome", r=3)
    groups = F.token_groups(merged, x)
    final = edgetok.token_counts(merged, x)[-1]
    for row in groups:
        assert (row >= 0).all()  # ToMe drops nothing
        assert len(set(row.tolist())) == final - 1  # every non-class token holds >= 1 patch
    dropped = F.token_groups(edgetok.apply(vit, "drop", r=[0, 8, 0]), x)
    assert ((dropped == -1).sum(1) == 8).all()


def test_merge_picture_fills_groups_and_darkens_dropped():
    img = np.zeros((4, 4, 3), np.uint8)
    img[:2, :2], img[:2, 2:], img[2:, :2], img[2:, 2:] = 200, 100, 100, 50
    out = F.merge_picture(img, np.array([0, 0, -1, 1]), (2, 2))[..., 0]
    assert out[0, 0] == out[0, 3] == 150  # group 0 (top row) = mean of 200 and 100, no border between them
    assert out[1, 0] == 255 and out[2, 1] == 255  # borders to the groups below / to the right
    assert out[3, 0] == 15  # dropped patch: darkened to 15%
    assert out[3, 3] == 50  # a group of one keeps its pixels' mean


@pytest.mark.skipif(not HAS_DATA, reason="scikit-image not installed (pip install 'edgetok[data]')")
def test_labelled_set_from_shipped_photos_is_deterministic(tmp_path, vit):
    a = F.labelled_set(size=64, per_class=4, classes=3, seed=0)
    b = F.labelled_set(size=64, per_class=4, classes=3, seed=0)
    assert a.x.shape == (12, 3, 64, 64) and a.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert a.gallery.sum() == 6 and torch.equal(a.x, b.x)
    assert len(F.photos()) >= 10
    pytest.importorskip("matplotlib", reason="the plot extra is not installed (pip install 'edgetok[plot]')")
    out = F.plot_merges(edgetok.apply(vit, "tome", r=3), F.photos()["chelsea"], tmp_path / "m.png")
    assert out.stat().st_size > 1000


def test_missing_photo_packages_give_the_install_hint(monkeypatch):
    """Without scikit-image / scikit-learn the photos raise edgetok's hint, not a ModuleNotFoundError
    (importlib's find_spec imports the parent package and raises when it is absent)."""
    import sys

    for name in ("skimage", "skimage.data", "sklearn", "sklearn.datasets", "sklearn.datasets.images"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(edgetok.errors.MissingDependencyError, match=r"pip install 'edgetok\[data\]'"):
        F.photos()
