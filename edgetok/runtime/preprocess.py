"""Image preprocessing from the export manifest: layout, scaling, resize, normalise.

Accepts numpy or torch; HWC/NHWC uint8 photos or CHW/NCHW floats. uint8 images
are scaled to [0, 1]; images of another size are resized to the model's size
when the manifest gives one (``resize=False`` makes that an error instead);
then (x - mean) / std per channel. Output: float32 NCHW numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import InputShapeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocessor:
    size: tuple[int, int]  # (H, W) the model takes
    channels: int = 3
    mean: Optional[Sequence[float]] = None  # None: the inputs are already normalised
    std: Optional[Sequence[float]] = None
    interpolation: str = "bilinear"
    resize: bool = True

    @classmethod
    def from_manifest(cls, manifest, input_shape: Sequence, resize: bool = True) -> "Preprocessor":
        """From an export's Manifest (runtime/manifest.py), or None when there is none."""
        return cls.from_preprocessing(manifest.preprocessing if manifest else None, input_shape, resize)

    @classmethod
    def from_preprocessing(cls, pre: Optional[dict], input_shape: Sequence, resize: bool = True) -> "Preprocessor":
        c, h, w = (int(d) if isinstance(d, int) else None for d in list(input_shape)[1:4])
        pre = pre or {}
        size = pre.get("size")
        if size is not None:
            size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size[-2:])
        size = (h, w) if h and w else size
        if size is None:
            raise InputShapeError("the model's image size is unknown (dynamic in the ONNX, no manifest); export it for a fixed size")
        return cls(size, c or 3, pre.get("mean"), pre.get("std"), pre.get("interpolation", "bilinear"), resize)

    def __call__(self, images) -> np.ndarray:
        x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise InputShapeError(f"expected an image or a batch of images (3 or 4 dims), got shape {list(x.shape)}")
        if x.shape[1] != self.channels and x.shape[-1] == self.channels:  # NHWC -> NCHW
            x = x.transpose(0, 3, 1, 2)
        if x.shape[1] != self.channels:
            raise InputShapeError(
                f"expected {self.channels}-channel images (NCHW or NHWC), got shape {list(x.shape)}"
            )
        raw = x.dtype == np.uint8
        x = x.astype(np.float32) / 255.0 if raw else x.astype(np.float32, copy=False)
        if tuple(x.shape[2:]) != tuple(self.size):
            if not self.resize:
                raise InputShapeError(
                    f"images are {x.shape[2]}x{x.shape[3]} but the model takes {self.size[0]}x{self.size[1]}; "
                    "resize them (or load the session with resize=True)"
                )
            x = _resize(x, self.size, self.interpolation)
        if self.mean is not None and self.std is not None:
            mean = np.asarray(self.mean, np.float32)[None, :, None, None]
            std = np.asarray(self.std, np.float32)[None, :, None, None]
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32)


def _resize(x: np.ndarray, size, interpolation: str) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    t = torch.from_numpy(np.ascontiguousarray(x))
    kw = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
    return F.interpolate(t, size=tuple(size), mode=mode, **kw).numpy()
