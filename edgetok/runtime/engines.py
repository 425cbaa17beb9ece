"""Reads the engine manifest (engine.json next to engine.plan, written by
edgetok/trt/manifest.py): a TensorRT engine only runs on the GPU model and TensorRT
version that built it, so loading checks both before deserialising."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import EdgetokError
from .artifacts import engine_manifest_path, read_json
from .env import GpuInfo

SCHEMA = "edgetok.engine/1"


class EngineMismatchError(EdgetokError, RuntimeError):
    """An engine was built for another GPU or TensorRT version than this machine has."""


def load_manifest(engine: Path) -> dict:
    path = engine_manifest_path(Path(engine))
    if not path.exists():
        raise EngineMismatchError(
            f"{engine} has no {path.name} next to it, so the GPU and TensorRT version it was built for are unknown; "
            "rebuild it with `edgetok build`"
        )
    return read_json(path)


def check_engine(manifest: dict, engine: Path, gpu: Optional[GpuInfo], trt_version: Optional[str]) -> None:
    """Raise EngineMismatchError when this machine cannot run the engine the manifest describes."""
    built_gpu = manifest.get("gpu") or {}
    built_trt = manifest.get("tensorrt")
    fix = f"rebuild it here: `edgetok build {Path(engine).parent} --config <this device's config>`"
    if trt_version is not None and built_trt and built_trt != trt_version:
        raise EngineMismatchError(
            f"{engine} was built with TensorRT {built_trt}, this machine has TensorRT {trt_version}; {fix}"
        )
    name, here = str(built_gpu.get("name", "")), gpu.name if gpu else ""
    # names differ by source (nvidia-smi vs the Jetson device tree): "Orin" matches "NVIDIA Jetson AGX Orin"
    same_name = not name or name in here or here in name
    if gpu is not None and built_gpu and (built_gpu.get("sm") != gpu.sm or not same_name):
        raise EngineMismatchError(
            f"{engine} was built for {built_gpu.get('name')} (sm_{built_gpu.get('sm')}), "
            f"this machine has {gpu.name} (sm_{gpu.sm}); {fix}"
        )
