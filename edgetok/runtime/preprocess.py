"""Image preprocessing exactly as the model's own library does it: the one preprocessing
module of edgetok (the runtime, the fidelity tools, the samples and the streaming session
use it).

The export records the model's data config as a ``PreprocessSpec`` (the manifest's
``preprocessing``, filled by edgetok/patch/data_config.py from timm's data config, the
Hugging Face image processor or torchvision's weights transforms) and this module replays
it with the same operations those libraries run:

- ``backend="pil"`` (timm, torchvision weights transforms on PIL images): PIL resize
  through torchvision (shortest edge, or both edges), torchvision's centre crop (offsets
  rounded), /255, normalise;
- ``backend="tensor"`` (transformers 5.x image processors, torchvision backend): the
  image as a uint8 tensor, torchvision's antialiased resize on it (uint8 out), the
  processor's centre crop (offsets truncated), then one fused rescale + normalise.

8-bit images (uint8, or other integer arrays within 0..255; PIL images) take that exact
path: tests/test_preprocess.py compares it with timm's ``create_transform``, the HF
processors and torchvision's transforms on real photos (max abs difference <= 1e-5).
Float images must already be in [0, 1]; they go through the same steps as float tensors
(no 8-bit rounding after the resize), which differs from the libraries' own uint8 path by
the resize kernel's rounding only. Several images of different sizes can be given as a
list. Output: float32 NCHW numpy.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..errors import InputShapeError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming", "nearest-exact")


class PreprocessSpec(BaseModel):
    """What the model's library does to an image before the model sees it."""

    model_config = ConfigDict(extra="forbid")

    size: list[int]  # [H, W] the model takes
    resize: Optional[dict[str, int]] = None  # {"shortest_edge": S} or {"height": H, "width": W}; None: no resize
    crop: Optional[list[int]] = None  # [H, W] centre crop after the resize; None: no crop
    crop_offsets: Literal["round", "floor"] = "round"  # torchvision rounds the crop's offsets, HF truncates
    interpolation: Literal[INTERPOLATIONS] = "bilinear"
    backend: Literal["pil", "tensor"] = "pil"
    rescale: float = 1 / 255
    mean: Optional[list[float]] = None  # None: no normalisation
    std: Optional[list[float]] = None
    convert_rgb: bool = True
    source: str = ""


class Preprocessor:
    """``Preprocessor(spec, input_shape)(images)`` -> float32 NCHW numpy for the model."""

    def __init__(self, spec: Optional[PreprocessSpec], input_shape: Sequence, resize: bool = True):
        c, h, w = (int(d) if isinstance(d, int) else None for d in list(input_shape)[1:4])
        if spec is None and not (h and w):
            raise InputShapeError("the model's image size is unknown (dynamic in the ONNX, no manifest); "
                                  "export it for a fixed size")
        self.spec, self.channels, self.resize = spec, c or 3, resize
        self.size = (h, w) if h and w else tuple(spec.size)

    @classmethod
    def from_manifest(cls, manifest, input_shape: Sequence, resize: bool = True) -> "Preprocessor":
        """From an export's Manifest (runtime/manifest.py), or None when there is none."""
        return cls(manifest.preprocessing if manifest is not None else None, input_shape, resize)

    def __call__(self, images) -> np.ndarray:
        items = [as_uint8_or_float(im) for im in _images(images, self.channels)]
        if not items:
            raise InputShapeError("no images given")
        return np.ascontiguousarray(np.stack([self.one(im) for im in items]), dtype=np.float32)

    def one(self, image: np.ndarray) -> np.ndarray:
        """One HWC image (uint8, or float in [0, 1]) -> CHW float32."""
        import torch

        spec = self.spec
        if spec is None:  # nothing known: only the size and 8-bit scaling
            x = torch.from_numpy(_float01(image)).permute(2, 0, 1)
            return self._fit(x).numpy()
        if image.dtype == np.uint8 and spec.backend == "pil":
            x = _pil_path(image, spec)
        elif image.dtype == np.uint8:
            x = _uint8_tensor_path(image, spec)
        else:
            x = _float_path(torch.from_numpy(_float01(image)).permute(2, 0, 1).contiguous(), spec)
        return self._fit(x).numpy()

    def _fit(self, x):
        """The model's size: what the spec produced, else a resize the caller allowed."""
        if tuple(x.shape[1:]) == tuple(self.size):
            return x
        if not self.resize:
            raise InputShapeError(f"images are {x.shape[1]}x{x.shape[2]} but the model takes "
                                  f"{self.size[0]}x{self.size[1]}; resize them (or load the session with resize=True)")
        import torch.nn.functional as F

        return F.interpolate(x[None], size=tuple(self.size), mode="bilinear", antialias=True, align_corners=False)[0]


# -- the image paths -------------------------------------------------------------------------
def _mode(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def _resize_arg(spec: PreprocessSpec, height: int, width: int):
    """The (H, W) the spec's resize gives an image of that size (torchvision's and HF's rule:
    the shorter edge to S, the longer int(S * long / short))."""
    r = spec.resize
    if "shortest_edge" in r:
        s = r["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(s * long / short)
        return (new_long, s) if width <= height else (s, new_long)
    return r["height"], r["width"]


def _crop_box(spec: PreprocessSpec, height: int, width: int) -> tuple[int, int, int, int]:
    ch, cw = spec.crop
    if spec.crop_offsets == "round":
        return int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0)), ch, cw
    return int((height - ch) / 2.0), int((width - cw) / 2.0), ch, cw


def _normalize(x, spec: PreprocessSpec, fused: bool):
    """Rescale + normalise in float32: separately (torchvision's ToTensor then Normalize) or
    fused into one normalise as the HF processors do (mean and std divided by the rescale)."""
    import torch

    if spec.mean is None or spec.std is None:
        return x.to(torch.float32) * spec.rescale if fused else x
    mean, std = torch.tensor(spec.mean, dtype=torch.float32), torch.tensor(spec.std, dtype=torch.float32)
    if fused:
        mean, std = torch.tensor(spec.mean) * (1.0 / spec.rescale), torch.tensor(spec.std) * (1.0 / spec.rescale)
        mean, std = mean.to(torch.float32), std.to(torch.float32)
    return (x.to(torch.float32) - mean[:, None, None]) / std[:, None, None]


def _pil_path(image: np.ndarray, spec: PreprocessSpec):
    import torch
    import torchvision.transforms.functional as TF
    from PIL import Image

    pil = Image.fromarray(image if image.shape[2] != 1 else image[..., 0])
    if spec.convert_rgb:
        pil = pil.convert("RGB")
    if spec.resize is not None:
        size = list(_resize_arg(spec, pil.height, pil.width))
        pil = TF.resize(pil, size, interpolation=_mode(spec.interpolation))
    if spec.crop is not None:
        top, left, ch, cw = _crop_box(spec, pil.height, pil.width)
        pil = TF.crop(pil, top, left, ch, cw)
    x = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div(255)
    if spec.rescale != 1 / 255:
        x = x * (spec.rescale * 255)
    return _normalize(x, spec, fused=False)


def _uint8_tensor_path(image: np.ndarray, spec: PreprocessSpec):
    import torch

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    if spec.convert_rgb and x.shape[0] == 1:
        x = x.expand(3, -1, -1).contiguous()
    return _normalize(_resize_crop(x, spec), spec, fused=True)


def _float_path(x, spec: PreprocessSpec):
    """A [0, 1] float image: the same resize and crop on floats, then normalise."""
    x = _resize_crop(x, spec)
    if spec.mean is None or spec.std is None:
        return x
    import torch

    mean, std = torch.tensor(spec.mean, dtype=x.dtype), torch.tensor(spec.std, dtype=x.dtype)
    return (x - mean[:, None, None]) / std[:, None, None]


def _resize_crop(x, spec: PreprocessSpec):
    import torchvision.transforms.v2.functional as F

    if spec.resize is not None:
        x = F.resize(x, list(_resize_arg(spec, x.shape[1], x.shape[2])), interpolation=_mode(spec.interpolation),
                     antialias=True)
    if spec.crop is not None:
        top, left, ch, cw = _crop_box(spec, x.shape[1], x.shape[2])
        x = F.crop(x, top, left, ch, cw)
    return x


# -- what the caller gives -------------------------------------------------------------------
def _images(images, channels: int) -> list[np.ndarray]:
    """PIL images, numpy arrays or torch tensors (one image, a batch, or a list of images of
    any sizes) -> a list of HWC arrays."""
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in _images(item, channels)]
    if hasattr(images, "getbands"):  # PIL
        arr = np.asarray(images)
        return [arr[..., None] if arr.ndim == 2 else arr]
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if x.ndim == 2:
        return [x[..., None]]
    if x.ndim == 3:
        return [_hwc(x, channels)]
    if x.ndim == 4:
        return [_hwc(im, channels) for im in x]
    raise InputShapeError(f"expected an image or a batch of images (2, 3 or 4 dims), got shape {list(x.shape)}")


def _hwc(x: np.ndarray, channels: int) -> np.ndarray:
    if x.shape[-1] in (channels, 1, 4) and x.shape[0] not in (channels, 1, 4):
        return x
    if x.shape[0] in (channels, 1, 4):
        return np.moveaxis(x, 0, -1)
    raise InputShapeError(f"expected {channels}-channel images (CHW or HWC), got shape {list(x.shape)}")


def _float01(image: np.ndarray) -> np.ndarray:
    """HWC image -> float32 in [0, 1] (8-bit scaled); a float image outside [0, 1] is an error."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255
    x = image.astype(np.float32)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InputShapeError(f"float images must be scaled to [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                              "pass 8-bit images as uint8, or divide by 255")
    return x


def as_uint8_or_float(image: np.ndarray) -> np.ndarray:
    """Integer images within 0..255 are 8-bit images; others are refused (ambiguous scale)."""
    if image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating):
        return image
    if np.issubdtype(image.dtype, np.integer) or image.dtype == np.bool_:
        lo, hi = (int(image.min()), int(image.max())) if image.size else (0, 0)
        if lo < 0 or hi > 255:
            raise InputShapeError(f"integer images must be 8-bit (0..255), got values in [{lo}, {hi}]; "
                                  "scale them to uint8 or to floats in [0, 1]")
        return image.astype(np.uint8)
    raise InputShapeError(f"images of dtype {image.dtype} are not supported; pass uint8 or float32 in [0, 1]")
