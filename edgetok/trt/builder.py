"""Build a TensorRT engine from an export with the TensorRT Python API.

``build(path, config)`` is the one entry. For a TensorRT config: when TensorRT
is installed it builds (or reuses) ``engine.plan`` + ``engine.json``; when it is
not, it writes a self-contained device build script instead (script.py) and
says so. For a TensorRT-RTX config (runtime ``tensorrt-rtx``) it builds
``engine.rtx.plan`` + ``engine.rtx.json`` ahead of time, on a machine without
a GPU. Both go through ``compile_engine`` (the builder APIs are the same) and
record a build report (parser warnings, layers by type, bytes, seconds,
precision, profiles). An engine is rebuilt only when its build key changes: the
ONNX sha256, the config, the TensorRT version, the GPU(s) and the plugin
library.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import EdgetokError
from ..runtime.artifacts import ENGINE_NAME, engine_manifest_path, read_json, resolve, sha256_file, write_atomic, write_json
from ..runtime.env import (GpuInfo, gpu_info, import_tensorrt, import_tensorrt_rtx, plugin_library, tensorrt_rtx_version,
                  tensorrt_version)
from .manifest import make_manifest
from .plan import BuildPlan, TargetMismatchError, sm_name, strongly_typed

RTX_ENGINE_NAME = "engine.rtx.plan"  # not engine.plan: TensorRT's runtime cannot load a TensorRT-RTX engine


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
    if config.runtime == "tensorrt-rtx":
        return _build_rtx(plan, out_dir, force)
    trt_version = tensorrt_version()
    if trt_version is None:
        from .script import write_build_bundle

        lib = None
        if plan.needs_plugin:
            try:
                lib = plugin_library(plugin_lib)
            except EdgetokError:
                lib = None  # the script builds the plugin on the device
        check = rtx_build_check(plan)
        script = write_build_bundle(plan, out_dir / "trt_build", plugin_lib=lib, rtx_check=check)
        return BuildResult(
            "script", script, read_json(script.parent / "build.json"),
            f"TensorRT is not installed here: wrote {script}; copy {script.parent} to the device and run "
            f"`bash {script.name}` there (it builds the plugins and runs trtexec)" + _check_note(check),
        )
    gpu = gpu_info()
    check_machine(plan, trt_version, gpu)
    lib = plugin_library(plugin_lib) if plan.needs_plugin else None
    lib_sha = sha256_file(lib) if lib else None
    key = plan.build_key(trt_version, gpu.to_dict() if gpu else None, lib_sha)
    engine = out_dir / ENGINE_NAME
    cached = _cached(engine, key, force)
    if cached is not None:
        return cached
    cache = Path(timing_cache) if timing_cache else default_timing_cache(gpu, trt_version)
    cast, _, notes = plan.precision_for(trt_version)
    data, report = compile_engine(import_tensorrt(), plan, cast, strongly_typed(trt_version), lib=lib, cache=cache)
    write_atomic(engine, data)
    manifest = make_manifest(
        plan, key, trt_version, gpu, {"path": str(lib), "sha256": lib_sha} if lib else None, cast, notes, str(cache)
    ) | {"build": report}
    write_json(engine_manifest_path(engine), manifest)
    return BuildResult("engine", engine, manifest, f"built {engine} ({len(data) / 2**20:.1f} MiB)")


def rtx_build_check(plan: BuildPlan) -> Optional[dict]:
    """Where TensorRT-RTX is installed: parse and build the plan's graph with it (TensorRT's parser
    and graph compiler), plugin nodes through the build-time stand-ins (pyplugins), and discard the
    engine. Evidence that the device build will parse, not proof (another TensorRT version).
    -> {"ok", "tensorrt_rtx", "layers", "plugin_layers", "build_seconds"} or {"ok": False, "error"}; None
    when TensorRT-RTX is missing."""
    version = tensorrt_rtx_version()
    if version is None:
        return None
    from .pyplugins import PluginLoaderError

    try:
        cast = plan.typed_precision()[0]
        _, report = compile_engine(import_tensorrt_rtx(), plan, cast, True, stand_ins=plan.needs_plugin)
    except (BuildError, PluginLoaderError) as e:
        return {"ok": False, "tensorrt_rtx": version, "error": str(e)}
    return {"ok": True, "tensorrt_rtx": version, "layers": report["layers"],
            "plugin_layers": report["layers_by_type"].get("PLUGIN_V3", 0), "build_seconds": report["build_seconds"]}


def _check_note(check: Optional[dict]) -> str:
    if check is None:
        return ""
    if check["ok"]:
        return (f"; TensorRT-RTX {check['tensorrt_rtx']} parsed and built this graph here ({check['layers']} layers, "
                f"{check['plugin_layers']} edgetok plugin layers through build-time stand-ins; no engine kept)")
    return f"; WARNING: TensorRT-RTX {check['tensorrt_rtx']} could not build this graph: {check['error']}"


def _cached(engine: Path, key: str, force: bool) -> Optional[BuildResult]:
    mpath = engine_manifest_path(engine)
    if not force and engine.exists() and mpath.exists():
        old = read_json(mpath)
        if old.get("build_key") == key:
            return BuildResult("cached", engine, old, f"{engine} is up to date (build key {key[:12]})")
    return None


def _build_rtx(plan: BuildPlan, out_dir: Path, force: bool) -> BuildResult:
    """TensorRT-RTX builds ahead of time, without a GPU, for the config's compute capabilities;
    the engine runs on those RTX GPUs with TensorRT-RTX's runtime (not TensorRT's)."""
    cfg = plan.config
    version = tensorrt_rtx_version()
    trt = import_tensorrt_rtx()  # fails naming the `rtx` extra when missing
    if not cfg.tensorrt.contains(version):
        raise TargetMismatchError(f"config {cfg.name!r} is for TensorRT-RTX {cfg.tensorrt}, this machine has "
                                  f"TensorRT-RTX {version}; install a matching version or change the config's range")
    caps = list(cfg.compute_capabilities or [])
    key = plan.build_key(f"rtx-{version}", {"compute_capabilities": caps}, None)
    engine = out_dir / RTX_ENGINE_NAME
    cached = _cached(engine, key, force)
    if cached is not None:
        return cached
    cast, notes = plan.typed_precision()

    def target(config):
        if caps:
            config.num_compute_capabilities = len(caps)
            for i, cc in enumerate(caps):
                config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{cc}"), i)

    data, report = compile_engine(trt, plan, cast, True, configure=target)
    write_atomic(engine, data)
    manifest = make_manifest(plan, key, version, None, None, cast, notes, None) | {
        "runtime": "tensorrt-rtx", "compute_capabilities": caps, "build": report}
    write_json(engine_manifest_path(engine), manifest)
    return BuildResult("engine", engine, manifest,
                       f"built {engine} with TensorRT-RTX {version} for sm_{', sm_'.join(map(str, caps)) or 'default'} "
                       f"({report['engine_bytes'] / 2**20:.1f} MiB, {report['layers']} layers, "
                       f"{report['build_seconds']:.1f} s); it runs on those RTX GPUs with the TensorRT-RTX runtime")


def _onnx_for_build(plan: BuildPlan, cast: Optional[str], tmp: Path) -> Path:
    if cast is None:
        return plan.onnx
    import onnx

    from .cast import cast_model, fp32_gemm

    model = onnx.load(str(plan.onnx))
    out = tmp / f"model.{cast}.onnx"
    onnx.save(cast_model(model, cast, fp32_gemm(plan.config)), str(out))
    return out


def _logger(trt):
    """A TensorRT logger that keeps warnings and errors for the build report."""

    class Collecting(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.warnings: list[str] = []
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)

    return Collecting()


def _parse(trt, builder, logger, plan: BuildPlan, cast: Optional[str], strong: bool, lib: Optional[Path]):
    if lib is not None:
        trt.init_libnvinfer_plugins(logger, "")
        registry = trt.get_plugin_registry()
        if hasattr(registry, "load_library"):
            registry.load_library(str(lib))
        else:  # TensorRT 8.5: creators register themselves when the library is loaded
            import ctypes

            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    flags = 0
    if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and trt.__version__.startswith("8."):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = _onnx_for_build(plan, cast, Path(tmp))
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            hint = " (is the edgetok plugin library loaded?)" if plan.needs_plugin else ""
            raise BuildError(f"TensorRT could not parse {plan.onnx}: {errors}{hint}")
    return network, parser


def compile_engine(trt, plan: BuildPlan, cast: Optional[str], strong: bool, lib: Optional[Path] = None,
                   cache: Optional[Path] = None, configure=None, stand_ins: bool = False) -> tuple[bytes, dict]:
    """Parse and build ``plan`` with the TensorRT module ``trt`` (TensorRT or TensorRT-RTX: the
    builder APIs are the same); ``stand_ins``: the edgetok plugin nodes through pyplugins' build-time
    stand-ins (the engine cannot run). -> (serialized engine, build report)."""
    import contextlib

    from .pyplugins import register

    with register(trt) if stand_ins else contextlib.nullcontext():
        return _compile(trt, plan, cast, strong, lib, cache, configure)


def _compile(trt, plan: BuildPlan, cast, strong, lib, cache, configure) -> tuple[bytes, dict]:
    import collections
    import time

    start = time.monotonic()  # the build's wall time, for the report (model timings live in validate/)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, plan, cast, strong, lib)
    parser_warnings = list(logger.warnings)
    layer_types = collections.Counter(str(network.get_layer(i).type).rsplit(".", 1)[-1]
                                      for i in range(network.num_layers))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.config.workspace_mib << 20)
    if plan.batch_dynamic:
        profile = builder.create_optimization_profile()
        for name, shapes in plan.profile().items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    if not strong:
        p = plan.config.precision
        if p in ("fp16", "best", "int8"):  # int8: the Q/DQ layers; fp16 for what is not quantized
            config.set_flag(trt.BuilderFlag.FP16)
        if p in ("int8", "best"):
            config.set_flag(trt.BuilderFlag.INT8)
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if configure is not None:
        configure(config)
    if cache is not None:
        blob = cache.read_bytes() if cache.exists() else b""
        config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-3:]) or "no error message from TensorRT"
        raise BuildError(f"TensorRT failed to build an engine from {plan.onnx}: {detail}")
    if cache is not None:
        write_atomic(cache, bytes(config.get_timing_cache().serialize()))
    data = bytes(serialized)
    report = {
        "parser_warnings": len(parser_warnings),
        "parser_warning_examples": sorted(set(parser_warnings))[:5],
        "build_warnings": len(logger.warnings) - len(parser_warnings),
        "layers": network.num_layers,
        "layers_by_type": dict(sorted(layer_types.items())),
        "engine_bytes": len(data),
        "build_seconds": round(time.monotonic() - start, 2),
        "precision": plan.config.precision,
        "cast": cast,
        "strongly_typed": strong,
        "profiles": {name: {k: list(v) for k, v in p.items()} for name, p in plan.profile().items()},
    }
    return data, report
