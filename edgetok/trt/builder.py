"""Build a TensorRT engine from an export with the TensorRT Python API.

``build(path, config)`` is the one entry: when TensorRT is installed it builds
(or reuses) ``engine.plan`` + ``engine.json``; when it is not, it writes a
self-contained device build script instead (script.py) and says so. An engine
is rebuilt only when its build key changes: the ONNX sha256, the config, the
TensorRT version, the GPU and the plugin library.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import EdgetokError
from ..runtime.artifacts import ENGINE_NAME, engine_manifest_path, read_json, resolve, sha256_file, write_atomic, write_json
from .env import GpuInfo, gpu_info, import_tensorrt, plugin_library, tensorrt_version
from .manifest import make_manifest
from .plan import BuildPlan, TargetMismatchError, sm_name


class BuildError(EdgetokError, RuntimeError):
    """TensorRT could not parse or build the network."""


@dataclass
class BuildResult:
    kind: str  # "engine" (built), "cached" (up to date, not rebuilt) or "script" (no TensorRT here)
    path: Path  # the engine, or the build script
    manifest: dict = field(default_factory=dict)
    message: str = ""


def cache_dir() -> Path:
    return Path(os.environ.get("EDGETOK_CACHE_DIR", Path.home() / ".cache" / "edgetok"))


def default_timing_cache(gpu: Optional[GpuInfo], trt_version: str) -> Path:
    """One timing cache per GPU arch and TensorRT version, shared by every build on this machine."""
    arch = sm_name(gpu.sm) if gpu else "unknown"
    return cache_dir() / "timing" / f"{arch}-trt{trt_version}.cache"


def check_machine(plan: BuildPlan, trt_version: str, gpu: Optional[GpuInfo]) -> None:
    """The config must be meant for this machine's TensorRT and GPU."""
    cfg = plan.config
    if cfg.tensorrt is not None and not cfg.tensorrt.contains(trt_version):
        raise TargetMismatchError(
            f"config {cfg.name!r} is for TensorRT {cfg.tensorrt}, this machine has TensorRT {trt_version}; "
            "use the config of this device (or install a matching TensorRT)"
        )
    if gpu is None:
        raise TargetMismatchError("TensorRT is installed but no CUDA GPU is visible; build on the target device")
    if cfg.sm is not None and cfg.sm != gpu.sm:
        raise TargetMismatchError(
            f"config {cfg.name!r} targets {sm_name(cfg.sm)} but this GPU is {gpu.name} ({sm_name(gpu.sm)}); "
            "use the config for this GPU, or build on the target device"
        )


def build(
    path,
    config,
    output: Optional[os.PathLike] = None,
    plugin_lib: Optional[os.PathLike] = None,
    timing_cache: Optional[os.PathLike] = None,
    force: bool = False,
    dla_core: Optional[int] = None,
) -> BuildResult:
    """Build ``path`` (export dir or ONNX file) for ``config`` (ExportConfig or its name/path)."""
    if not hasattr(config, "runtime"):
        from ..config import load_config

        config = load_config(config)
    art = resolve(path)
    plan = BuildPlan.create(art, config, dla_core)
    out_dir = Path(output) if output else art.root
    trt_version = tensorrt_version()
    if trt_version is None:
        from .script import write_build_bundle

        lib = None
        if plan.needs_plugin:
            try:
                lib = plugin_library(plugin_lib)
            except EdgetokError:
                lib = None  # the script builds the plugin on the device
        script = write_build_bundle(plan, out_dir / "trt_build", plugin_lib=lib)
        return BuildResult(
            "script", script, read_json(script.parent / "build.json"),
            f"TensorRT is not installed here: wrote {script}; copy {script.parent} to the device and run "
            f"`bash {script.name}` there (it builds the plugins and runs trtexec)",
        )
    gpu = gpu_info()
    check_machine(plan, trt_version, gpu)
    lib = plugin_library(plugin_lib) if plan.needs_plugin else None
    lib_sha = sha256_file(lib) if lib else None
    key = plan.build_key(trt_version, gpu.to_dict() if gpu else None, lib_sha)
    engine = out_dir / ENGINE_NAME
    mpath = engine_manifest_path(engine)
    if not force and engine.exists() and mpath.exists():
        old = read_json(mpath)
        if old.get("build_key") == key:
            return BuildResult("cached", engine, old, f"{engine} is up to date (build key {key[:12]})")
    cache = Path(timing_cache) if timing_cache else default_timing_cache(gpu, trt_version)
    cast, _, notes = plan.precision_for(trt_version)
    data = _build_serialized(plan, trt_version, cast, lib, cache)
    write_atomic(engine, data)
    manifest = make_manifest(
        plan, key, trt_version, gpu, {"path": str(lib), "sha256": lib_sha} if lib else None, cast, notes, str(cache)
    )
    write_json(mpath, manifest)
    return BuildResult("engine", engine, manifest, f"built {engine} ({len(data) / 2**20:.1f} MiB)")


def _onnx_for_build(plan: BuildPlan, cast: Optional[str], tmp: Path) -> Path:
    if cast is None:
        return plan.onnx
    import onnx

    from .cast import cast_model

    model = onnx.load(str(plan.onnx))
    out = tmp / f"model.{cast}.onnx"
    onnx.save(cast_model(model, cast), str(out))
    return out


def _build_serialized(plan: BuildPlan, trt_version: str, cast: Optional[str], lib: Optional[Path], cache: Path) -> bytes:
    trt = import_tensorrt()
    from .plan import strongly_typed

    logger = trt.Logger(trt.Logger.WARNING)
    if lib is not None:
        trt.init_libnvinfer_plugins(logger, "")
        registry = trt.get_plugin_registry()
        if hasattr(registry, "load_library"):
            registry.load_library(str(lib))
        else:  # TensorRT 8.5: creators register themselves when the library is loaded
            import ctypes

            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed(trt_version) and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and trt_version.startswith("8."):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = _onnx_for_build(plan, cast, Path(tmp))
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            hint = " (is the edgetok plugin library loaded?)" if plan.needs_plugin else ""
            raise BuildError(f"TensorRT could not parse {plan.onnx}: {errors}{hint}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.config.workspace_mib << 20)
    if plan.input.batch_dynamic:
        profile = builder.create_optimization_profile()
        shapes = plan.profile()
        profile.set_shape(plan.input.name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    if not strongly_typed(trt_version):
        p = plan.config.precision
        if p in ("fp16", "best"):
            config.set_flag(trt.BuilderFlag.FP16)
        if p in ("int8", "best"):
            config.set_flag(trt.BuilderFlag.INT8)
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    blob = cache.read_bytes() if cache.exists() else b""
    timing = config.create_timing_cache(blob)
    config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build an engine from {plan.onnx}; see the TensorRT log above")
    write_atomic(cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)
