"""``edgetok.runtime.load(PATH)``: a Session over the best backend for an export
directory, an ONNX file or an engine (or an nn.Module, with the torch backend)."""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np

from .artifacts import Artifacts, TensorSpec, resolve
from .backends import BackendError, Runner, TorchRunner, get_backend, pick_backend
from .preprocess import Preprocessor


class Session:
    """Preprocessing + one backend runner. ``run(images)`` -> {output name: numpy array}."""

    def __init__(self, runner: Runner, preprocess: Optional[Preprocessor], artifacts: Optional[Artifacts] = None):
        self.runner, self.preprocess, self.artifacts = runner, preprocess, artifacts

    @property
    def backend(self) -> str:
        return self.runner.backend

    @property
    def output_names(self) -> list[str]:
        return list(self.runner.output_names)

    @property
    def input(self) -> TensorSpec:
        return self.runner.input

    @property
    def manifest(self):
        """The export's Manifest (runtime/manifest.py), or None (a bare ONNX file, an nn.Module)."""
        return self.artifacts.manifest if self.artifacts else None

    def prepare(self, images) -> np.ndarray:
        """Images (numpy/torch, NCHW/NHWC, uint8/float) -> the model's float32 NCHW input."""
        if self.preprocess is not None:
            return self.preprocess(images)
        x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
        return np.ascontiguousarray(x, dtype=np.float32)

    def run(self, images) -> dict[str, np.ndarray]:
        return self.runner.infer(self.prepare(images))

    def run_prepared(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run an already-prepared input (what latency measurement times)."""
        return self.runner.infer(x)

    def __call__(self, images) -> np.ndarray:
        """The first output only (logits for a classifier)."""
        return self.run(images)[self.runner.output_names[0]]

    def sync(self) -> None:
        self.runner.sync()

    def __repr__(self) -> str:
        return f"Session({self.artifacts.root if self.artifacts else 'module'}, backend={self.backend!r})"


def load(
    path: Union[str, os.PathLike, "object"],
    backend: Optional[str] = None,
    preprocess: bool = True,
    resize: bool = True,
    **options,
) -> Session:
    """A Session for ``path``: an export dir, a .onnx file, an engine, or an nn.Module (torch backend).

    ``backend``: "trt", "ort-cuda", "ort-cpu" or "torch"; None picks the best available.
    ``preprocess``: apply the manifest's resize/normalisation (False: inputs are model-ready tensors).
    ``resize``: resize images of another size (False: a wrong size is an error).
    ``options`` go to the backend (threads=, plugin_lib=, device=, module=).
    """
    import torch

    if isinstance(path, torch.nn.Module):
        return _from_module(path, preprocess, resize, **options)
    art = resolve(path)
    impl = get_backend(backend) if backend else pick_backend(art)
    reason = impl.unavailable(art) if not (impl.name == "torch" and "module" in options) else None
    if reason:
        raise BackendError(f"backend {impl.name} cannot run {path}: {reason}")
    runner = impl.open(art, **options)
    pre = Preprocessor.from_manifest(art.manifest, runner.input.shape, resize) if preprocess else None
    return Session(runner, pre, art)


def _from_module(module, preprocess: bool, resize: bool, device: str = "cpu", **_) -> Session:
    from ..patch import adapter_for

    info = adapter_for(module).info(module)
    spec = TensorSpec("images", ["batch", *info.input_shape])
    pre = None
    if preprocess:
        from ..patch.data_config import data_config
        from .preprocess import PreprocessSpec

        found = data_config(module, None, info.image_size)
        pre = Preprocessor(PreprocessSpec.model_validate(found) if found else None, spec.shape, resize)
    return Session(TorchRunner(module, spec, ["output"], device), pre)
