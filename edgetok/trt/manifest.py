"""The engine manifest (engine.json next to engine.plan): what an engine was
built from and for. A TensorRT engine only runs on the GPU model and TensorRT
version that built it, so loading checks both before deserialising."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .. import __version__
from ..errors import EdgetokError
from ..runtime.artifacts import engine_manifest_path, read_json
from ..runtime.env import GpuInfo

SCHEMA = "edgetok.engine/1"


class EngineMismatchError(EdgetokError, RuntimeError):
    """An engine was built for another GPU or TensorRT version than this machine has."""


def make_manifest(plan, key: str, trt_version: str, gpu: Optional[GpuInfo], plugin: Optional[dict],
                  cast: Optional[str], notes: list[str], timing_cache: Optional[str]) -> dict:
    return {
        "schema": SCHEMA,
        "build_key": key,
        "tensorrt": trt_version,
        "gpu": gpu.to_dict() if gpu else None,
        "config": {"name": plan.config.name, "sha256": plan.config_hash(), "precision": plan.config.precision,
                   "target": plan.config.target, "sm": plan.config.sm},
        "onnx": {"path": plan.onnx.name, "sha256": plan.onnx_sha256, "cast": cast},
        "inputs": [{**spec.to_dict(), "profile": {k: list(v) for k, v in plan.profile()[spec.name].items()}}
                   for spec in plan.inputs],
        "outputs": [o.to_dict() for o in plan.outputs],
        "plugin": plugin,
        "dla_core": plan.dla_core,
        "timing_cache": timing_cache,
        "notes": notes,
        "edgetok": __version__,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


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
