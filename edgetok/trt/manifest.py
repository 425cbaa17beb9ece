"""Writes the engine manifest (engine.json next to engine.plan): what an engine was
built from and for. Its reader, which checks it before an engine is loaded, is
edgetok/runtime/engines.py."""
from __future__ import annotations

import time
from typing import Optional

from .._version import __version__
from ..runtime.engines import SCHEMA
from ..runtime.env import GpuInfo


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
