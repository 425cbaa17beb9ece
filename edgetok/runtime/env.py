"""What this machine offers for TensorRT: the TensorRT version, the GPU, the
edgetok plugin library. Nothing here imports tensorrt unless asked to."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import EdgetokError, MissingDependencyError


class PluginLibraryError(EdgetokError, FileNotFoundError):
    """The edgetok TensorRT plugin library is needed but cannot be found."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    sm: int  # compute capability x10, e.g. 87 for Orin

    def to_dict(self) -> dict:
        return {"name": self.name, "sm": self.sm}


def tensorrt_version() -> Optional[str]:
    """Installed TensorRT Python version, without importing it (None when absent)."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu12", "tensorrt-cu11"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return import_tensorrt().__version__  # JetPack's Debian package has no dist metadata


def import_tensorrt():
    """``import tensorrt`` with a message saying what to do when it is missing."""
    try:
        import tensorrt
    except ImportError as e:
        raise MissingDependencyError(
            f"TensorRT is not installed ({e}); install it on the GPU machine (JetPack ships it; "
            "elsewhere `pip install tensorrt`), or run `edgetok build` without it to get a build script"
        ) from None
    return tensorrt


RTX_MODULE = "tensorrt_rtx_bindings"
RTX_DISTS = ("tensorrt-rtx-cu12-bindings", "tensorrt-rtx-cu13-bindings")


def tensorrt_rtx_version() -> Optional[str]:
    """Installed TensorRT-RTX Python bindings version, without importing them (None when absent)."""
    if importlib.util.find_spec(RTX_MODULE) is None:
        return None
    for dist in RTX_DISTS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return import_tensorrt_rtx().__version__


def import_tensorrt_rtx():
    """``import tensorrt_rtx_bindings`` with a message naming the extra when it is missing. The first
    import goes through rtx_loader.prepare_loader(), without which the wheel's parser aborts the process
    on any plugin node (see rtx_loader); a graph without plugin nodes builds either way."""
    import sys

    if RTX_MODULE not in sys.modules and importlib.util.find_spec(RTX_MODULE) is not None:
        from .rtx_loader import PluginLoaderError, prepare_loader

        try:
            prepare_loader()
        except PluginLoaderError:
            pass  # pyplugins.register() raises it again where a plugin is needed
    try:
        return importlib.import_module(RTX_MODULE)
    except ImportError as e:
        raise MissingDependencyError(
            f"TensorRT-RTX is not installed ({e}); install it with `pip install 'edgetok[rtx]'` "
            "(the wheels tensorrt-rtx-cu12-libs and tensorrt-rtx-cu12-bindings; no GPU needed to build)"
        ) from None


def gpu_info() -> Optional[GpuInfo]:
    """The first CUDA GPU (torch when it sees one, else nvidia-smi), or None."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return GpuInfo(torch.cuda.get_device_name(0), major * 10 + minor)
    except Exception:  # a broken CUDA install must not stop CPU paths
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, cap = (s.strip() for s in out[0].rsplit(",", 1))
    major, _, minor = cap.partition(".")
    return GpuInfo(name, int(major) * 10 + int(minor or 0))


def plugin_library(explicit: Optional[os.PathLike] = None) -> Path:
    """The edgetok plugin library: ``explicit``, $EDGETOK_PLUGIN_LIBRARY, or
    ``edgetok.ops.plugins.library_path()``. Raises PluginLibraryError naming the fix."""
    candidate = explicit or os.environ.get("EDGETOK_PLUGIN_LIBRARY")
    if candidate:
        p = Path(candidate)
        if not p.is_file():
            raise PluginLibraryError(
                f"plugin library {p} does not exist; build it with `edgetok plugins build` "
                "(or cmake -S plugins -B build/plugins && cmake --build build/plugins) and pass its path"
            )
        return p
    try:
        from ..ops import plugins
    except ImportError as e:
        raise PluginLibraryError(
            f"cannot locate the edgetok plugin library: edgetok.ops.plugins is unavailable ({e}); "
            "pass --plugin-library PATH or set EDGETOK_PLUGIN_LIBRARY"
        ) from None
    locate = getattr(plugins, "library_path", None)
    if locate is None:
        raise PluginLibraryError(
            "edgetok.ops.plugins has no library_path(); pass --plugin-library PATH or set EDGETOK_PLUGIN_LIBRARY"
        )
    try:
        path = locate("trt")
    except (EdgetokError, FileNotFoundError) as e:
        raise PluginLibraryError(f"edgetok plugin library not found: {e}") from None
    if path is None or not Path(path).is_file():
        raise PluginLibraryError(
            f"edgetok plugin library not found ({path}); build it with `edgetok plugins build` "
            "or pass --plugin-library PATH"
        )
    return Path(path)
