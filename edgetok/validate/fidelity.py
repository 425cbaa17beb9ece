"""How much a reduced model still agrees with the unreduced one, on real photos.

No labelled data set ships with a package, so the labelled set is made from
the photos scikit-image and scikit-learn carry (extra ``data``): each photo is
one class, its samples are random crops, flips and brightness changes of it.
The metrics compare the reduced model with the unreduced model on the same
images:

- cosine similarity of the class token and of the pooled patch features
  (size-weighted mean of the final-norm tokens) per image, mean and minimum;
- k-NN label agreement: the fraction of query images whose k-NN label (cosine,
  gallery embedded by the same model) is the same for both models, next to the
  k-NN accuracy of each;
- ``token_groups`` / ``plot_merges``: which patches ended up in which token,
  drawn over the image (ToMe's visualisation: a merged group is filled with
  its mean colour, dropped patches are dark).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import EdgetokError, MissingDependencyError
from ..patch import adapter_for
from ..patch.base import run_blocks, weighted_mean

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# natural colour photos shipped inside the skimage and sklearn wheels (no download)
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
                  "hubble_deep_field.jpg", "ihc.png", "camera.png", "brick.png", "grass.png", "gravel.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


# -- images ------------------------------------------------------------------------
def _package_dir(module: str) -> Path:
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # find_spec imports the parent package, which may be absent
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"real photos need {module.split('.')[0]}: pip install 'edgetok[data]' (scikit-image, scikit-learn)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def photos() -> dict[str, np.ndarray]:
    """Name -> RGB uint8 [H,W,3] for every photo the installed packages ship."""
    from PIL import Image

    found = {}
    for module, names in (("skimage.data", SKIMAGE_PHOTOS), ("sklearn.datasets.images", SKLEARN_PHOTOS)):
        try:
            folder = _package_dir(module)
        except MissingDependencyError:
            continue
        for name in names:
            if (folder / name).is_file():
                found[name.rsplit(".", 1)[0]] = np.asarray(Image.open(folder / name).convert("RGB"))
    if not found:
        _package_dir("skimage.data")  # raises the install hint
    return found


def to_tensor(images: Sequence[np.ndarray], size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Shorter side to ``size`` (bicubic), centre crop, normalise -> [B,3,size,size], through the
    runtime's own preprocessing (edgetok/runtime/preprocess.py), so a fidelity figure measures the
    model on the inputs a deployment feeds it."""
    from ..runtime.preprocess import Preprocessor, PreprocessSpec

    spec = PreprocessSpec(size=[size, size], resize={"shortest_edge": size}, crop=[size, size],
                          interpolation="bicubic", mean=list(mean), std=list(std), source="edgetok fidelity")
    return torch.from_numpy(Preprocessor(spec, (None, 3, size, size))(list(images)))


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random view: crop of 30-100% of the area, flip, brightness x0.7-1.3."""
    h, w = img.shape[:2]
    scale = rng.uniform(0.3, 1.0)
    ch, cw = max(16, int(h * np.sqrt(scale))), max(16, int(w * np.sqrt(scale)))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    view = img[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        view = view[:, ::-1]
    return np.clip(view.astype(np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)


@dataclass
class LabelledSet:
    x: torch.Tensor  # [N,3,S,S], normalised
    labels: torch.Tensor  # [N] int64, one class per source photo
    classes: list[str]
    gallery: torch.Tensor  # bool [N]: True for gallery, False for query


def labelled_set(size: int = 224, per_class: int = 6, classes: Optional[int] = None, seed: int = 0) -> LabelledSet:
    """Views of each shipped photo as one class; half of each class is the k-NN gallery."""
    if per_class < 2:
        raise EdgetokError("per_class must be >= 2 (one gallery and one query view per class)")
    srcs = photos()
    names = sorted(srcs)[: classes or None]
    rng = np.random.default_rng(seed)
    views, labels, gallery = [], [], []
    for c, name in enumerate(names):
        for i in range(per_class):
            views.append(augment(srcs[name], rng))
            labels.append(c)
            gallery.append(i < per_class // 2)
    return LabelledSet(to_tensor(views, size), torch.tensor(labels), names, torch.tensor(gallery))


# -- features --------------------------------------------------------------------------
FINAL_NORMS = ("norm", "layernorm", "vision_model.post_layernorm", "post_layernorm", "dinov2.layernorm",
               "vit.layernorm", "encoder.ln")


def final_norm(model: nn.Module) -> nn.Module:
    for path in FINAL_NORMS:
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
        if isinstance(m, nn.Module) and not isinstance(m, nn.Identity):
            return m
    return nn.Identity()


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(class token [B,C], pooled patch features [B,C]) after the final norm; the
    pool is size-weighted, so merged tokens count for the patches they hold. A
    model without a class token reports the pooled features for both."""
    adapter = adapter_for(model)
    prefix = adapter.info(model).num_prefix
    norm = final_norm(model)
    cls, pooled = [], []
    for chunk in x.split(batch):
        tokens, size = run_blocks(adapter, model, adapter.embed(model, chunk))
        tokens = norm(tokens)
        p = weighted_mean(tokens[:, prefix:], None if size is None else size[:, prefix:])
        pooled.append(p)
        cls.append(tokens[:, 0] if prefix else p)
    return torch.cat(cls), torch.cat(pooled)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).float()


def knn_predict(feats: torch.Tensor, labels: torch.Tensor, gallery: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Label of every query (non-gallery row): majority of its k most cosine-similar
    gallery rows, ties to the class of the nearest among the tied."""
    f = nn.functional.normalize(feats.double(), dim=-1)
    g, q = f[gallery], f[~gallery]
    k = min(k, g.shape[0])
    sims, idx = (q @ g.T).topk(k, dim=-1)
    glabels = labels[gallery][idx]  # [Q,k], nearest first
    preds = []
    for row in glabels.tolist():
        votes = {c: row.count(c) for c in row}
        best = max(votes.values())
        preds.append(next(c for c in row if votes[c] == best))
    return torch.tensor(preds)


@dataclass
class Fidelity:
    cls_cosine_mean: float
    cls_cosine_min: float
    pooled_cosine_mean: float
    pooled_cosine_min: float
    knn_agreement: float
    knn_accuracy_base: float
    knn_accuracy_reduced: float
    images: int

    def to_dict(self) -> dict:
        return asdict(self)


def fidelity(base: nn.Module, reduced: nn.Module, data: LabelledSet, k: int = 3) -> Fidelity:
    """Reduced-vs-unreduced agreement on ``data`` (see the module docstring)."""
    b_cls, b_pool = features(base, data.x)
    r_cls, r_pool = features(reduced, data.x)
    cc, pc = cosine(b_cls, r_cls), cosine(b_pool, r_pool)
    truth = data.labels[~data.gallery]
    pb = knn_predict(b_cls, data.labels, data.gallery, k)
    pr = knn_predict(r_cls, data.labels, data.gallery, k)
    return Fidelity(
        cls_cosine_mean=float(cc.mean()), cls_cosine_min=float(cc.min()),
        pooled_cosine_mean=float(pc.mean()), pooled_cosine_min=float(pc.min()),
        knn_agreement=float((pb == pr).float().mean()),
        knn_accuracy_base=float((pb == truth).float().mean()),
        knn_accuracy_reduced=float((pr == truth).float().mean()),
        images=int(data.x.shape[0]),
    )


# -- which patches merged -------------------------------------------------------------------
class _SourceTracker(nn.Module):
    """Wraps a reducer: runs it on the tokens, and once more on the tokens with
    each token's source patches appended as channels (normalised to sum 1, so
    ToMe's size-weighted mean keeps them a distribution), reading where every
    patch went. Refuses methods whose choice depends on the appended channels."""

    def __init__(self, reducer: nn.Module, state: dict):
        super().__init__()
        self.reducer, self.state = reducer, state

    def forward(self, x, size, ctx):
        out, out_size = self.reducer(x, size, ctx)
        src = self.state["src"]
        aug, _ = self.reducer(torch.cat([x, src], -1), size, ctx)
        c = x.shape[-1]
        if aug.shape[1] != out.shape[1] or not torch.allclose(aug[..., :c], out, atol=1e-4, rtol=1e-4):
            raise EdgetokError(
                f"{type(self.reducer).__name__} chooses tokens from their values, so the merge map cannot be "
                "traced by appending source channels; visualise a ToMe/top-k/DyMU model instead"
            )
        self.state["src"] = aug[..., c:]
        return out, out_size


@torch.no_grad()
def token_groups(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """For each image and patch, the index of the final token holding it
    ([B, gh*gw] int64), or -1 where the patch was dropped."""
    adapter = adapter_for(model)
    info = adapter.info(model)
    tokens = adapter.embed(model, x)
    n = tokens.shape[1]
    state = {"src": torch.eye(n, dtype=tokens.dtype).expand(x.shape[0], n, n).clone()}
    blocks = list(adapter.blocks(model))
    saved = [getattr(b, "token_reducer", None) for b in blocks]
    try:
        for b, r in zip(blocks, saved):
            if r is not None:
                b.token_reducer = _SourceTracker(r, state)
        run_blocks(adapter, model, tokens)
    finally:
        for b, r in zip(blocks, saved):
            if r is not None:
                b.token_reducer = r
    src = state["src"][:, :, info.num_prefix :]  # [B, tokens out, patches]
    held = src > 1e-6
    groups = src.argmax(1)
    return torch.where(held.any(1), groups, torch.full_like(groups, -1))


def merge_picture(image: np.ndarray, groups: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``image`` [H,W,3] uint8 (already the model's size) with every group of
    patches filled with its mean colour, group borders drawn, dropped patches dark."""
    h, w = image.shape[:2]
    gh, gw = grid
    ph, pw = h // gh, w // gw
    patches = image[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw, 3).swapaxes(1, 2).astype(np.float32)
    g = groups.reshape(gh, gw)
    out = patches.copy()
    for gid in np.unique(g):
        mask = g == gid
        out[mask] = patches[mask].mean(axis=(0, 1, 2)) if gid >= 0 else patches[mask] * 0.15
    edge = np.zeros((gh, gw, ph, pw), bool)
    edge[:, :-1, :, -1] |= (g[:, :-1] != g[:, 1:])[..., None]
    edge[:-1, :, -1, :] |= (g[:-1] != g[1:])[..., None]
    out[edge] = 255.0
    return out.swapaxes(1, 2).reshape(gh * ph, gw * pw, 3).astype(np.uint8)


def plot_merges(model: nn.Module, image: np.ndarray, path, title: str = "") -> Path:
    """Write a PNG: the image and the model's token groups over it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("plots need matplotlib: pip install 'edgetok[plot]'") from None
    info = adapter_for(model).info(model)
    size = info.image_size[0]
    x = to_tensor([image], size)
    groups = token_groups(model, x)[0].numpy()
    shown = ((x[0].permute(1, 2, 0) * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)).clamp(0, 1) * 255)
    shown = shown.numpy().astype(np.uint8)
    kept = len(set(groups[groups >= 0].tolist()))
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    axes[0].imshow(shown)
    axes[0].set_title("input")
    axes[1].imshow(merge_picture(shown, groups, info.grid))
    axes[1].set_title(f"{len(groups)} patches -> {kept} tokens")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path) -> Path:
    from .figures import save_figure

    return save_figure(fig, path)
