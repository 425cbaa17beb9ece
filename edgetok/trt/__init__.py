"""TensorRT engines: build plans from an export + a deployment config, the
TensorRT Python API build (imported lazily), the equivalent trtexec command and
a device build script where TensorRT is missing, engine manifests and checks.

    from edgetok.trt import build
    result = build("out/vit", "jetson-orin-nano")   # engine, cached engine, or build script
"""
from .builder import BuildError, BuildResult, build
from ..runtime.env import GpuInfo, PluginLibraryError, gpu_info, plugin_library, tensorrt_version
from ..runtime.engines import EngineMismatchError, check_engine, load_manifest
from .plan import BuildPlan, TargetMismatchError

__all__ = [
    "build", "BuildResult", "BuildError", "BuildPlan", "TargetMismatchError", "EngineMismatchError",
    "PluginLibraryError", "GpuInfo", "gpu_info", "tensorrt_version", "plugin_library", "check_engine", "load_manifest",
]
