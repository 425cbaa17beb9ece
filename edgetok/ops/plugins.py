"""The fused CUDA kernels (plugins/): build them, find them, load them, use them from torch.

``build()`` runs CMake on plugins/ and gives the paths of what it built:
libedgetok_kernels.so (the kernels behind a C API), libedgetok_hostref.so (the
kernels' per-row logic compiled for the CPU, for tests) and, where TensorRT is
installed, libedgetok_trt_plugins.so (the IPluginV3 plugins that ``trtexec
--dynamicPlugins=`` and the TensorRT runtime load).

``register_cuda_kernels()`` gives the edgetok:: torch ops a CUDA implementation
that calls the kernels through ctypes when the library is built and the inputs
fit (same dtype for all float inputs: float32, float16 or bfloat16; a metric
width the match kernel stages, up to about 1,500), and the pure-torch reference
otherwise. Any token count a ViT uses runs on the kernels (docs/plugins.md). It
only registers; the library is loaded on the first CUDA call.

Where libraries are looked for: $EDGETOK_PLUGIN_DIR, else <repo>/build/plugins.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from ..errors import EdgetokError, MissingDependencyError

SOURCE_DIR = Path(__file__).resolve().parents[2] / "plugins"
DEFAULT_ARCHS = ("75", "80", "86", "87", "89", "90")  # T4, A100, RTX 30xx, Orin, L4, H100
LIBRARIES = {
    "kernels": "libedgetok_kernels.so",
    "hostref": "libedgetok_hostref.so",
    "trt": "libedgetok_trt_plugins.so",
}
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


class PluginBuildError(EdgetokError, RuntimeError):
    """CMake could not configure or build plugins/."""


class KernelError(EdgetokError, RuntimeError):
    """A kernel launcher returned an error code."""


def build_dir() -> Path:
    env = os.environ.get("EDGETOK_PLUGIN_DIR")
    return Path(env) if env else SOURCE_DIR.parent / "build" / "plugins"


def find_library(kind: str = "kernels", directory: Optional[Path] = None) -> Optional[Path]:
    """Path of a built library (``kernels``, ``hostref`` or ``trt``), or None."""
    if kind not in LIBRARIES:
        raise EdgetokError(f"unknown plugin library {kind!r}; use one of {', '.join(LIBRARIES)}")
    path = Path(directory or build_dir()) / LIBRARIES[kind]
    return path if path.is_file() else None


def library_path(kind: str = "kernels", directory: Optional[Path] = None) -> Path:
    """Like ``find_library`` but raises with the fix when the library is not built."""
    path = find_library(kind, directory)
    if path is None:
        where = Path(directory or build_dir()) / LIBRARIES[kind]
        hint = " (needs TensorRT installed: pass --tensorrt-root)" if kind == "trt" else ""
        raise FileNotFoundError(f"{where} is not built; run `edgetok plugins build`{hint}")
    return path


@dataclass
class BuildResult:
    directory: Path
    libraries: dict = field(default_factory=dict)  # kind -> Path of what exists after the build
    log: str = ""


def build(
    directory: Optional[Path] = None,
    archs: Optional[Sequence[str]] = None,
    kernels: bool = True,
    trt: bool = True,
    tensorrt_root: Optional[str] = None,
    jobs: Optional[int] = None,
) -> BuildResult:
    """Configure and build plugins/ with CMake into ``directory``.

    ``kernels=False`` builds only the CPU library (no nvcc needed). The TensorRT
    plugins are built when ``trt`` and CMake finds TensorRT (``tensorrt_root`` or
    $TENSORRT_ROOT); otherwise CMake says so and the rest still builds.
    """
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        raise PluginBuildError(f"no plugins/CMakeLists.txt under {SOURCE_DIR.parent}; build from a source checkout")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise MissingDependencyError("cmake is not on PATH; install it (pip install cmake or apt install cmake)")
    if kernels and not _nvcc():
        raise MissingDependencyError(
            "nvcc (the CUDA toolkit) is not on PATH or in /usr/local/cuda/bin; install CUDA, "
            "or build only the CPU test library with kernels=False (--no-kernels)"
        )
    out = Path(directory or build_dir())
    out.mkdir(parents=True, exist_ok=True)
    args = [
        cmake, "-S", str(SOURCE_DIR), "-B", str(out),
        f"-DEDGETOK_BUILD_KERNELS={'ON' if kernels else 'OFF'}",
        f"-DEDGETOK_BUILD_TRT_PLUGIN={'ON' if trt else 'OFF'}",
    ]
    if kernels:
        args += [f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs or DEFAULT_ARCHS)}", f"-DCMAKE_CUDA_COMPILER={_nvcc()}"]
    if tensorrt_root:
        args.append(f"-DTENSORRT_ROOT={tensorrt_root}")
    log = _run(args, "configure")
    log += _run([cmake, "--build", str(out), "-j", str(jobs or os.cpu_count() or 2)], "build")
    libs = {kind: p for kind in LIBRARIES if (p := find_library(kind, out)) is not None}
    _kernels_or_none.cache_clear()  # a process that fell back before the build picks the library up
    return BuildResult(out, libs, log)


def _nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _run(args: list, step: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise PluginBuildError(f"cmake {step} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


# --- the kernels library through ctypes -------------------------------------------------

_P, _I64, _SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
_SIGNATURES = {
    "edgetok_abi_version": (ctypes.c_int, []),
    "edgetok_last_error": (ctypes.c_char_p, []),
    "edgetok_token_merge_supported": (ctypes.c_int, [_I64, _I64]),
    "edgetok_token_drop_supported": (ctypes.c_int, [_I64]),
    "edgetok_token_merge_workspace_size": (_SZ, [_I64, _I64]),
    "edgetok_threshold_merge_workspace_size": (_SZ, [_I64, _I64]),
    "edgetok_token_drop_workspace_size": (_SZ, [_I64, _I64]),
    "edgetok_token_merge": (ctypes.c_int, [ctypes.c_int, _P, _P, _P, _P, _P] + [_I64] * 6 + [_P, _SZ, _P]),
    "edgetok_token_drop": (ctypes.c_int, [ctypes.c_int, _P, _P, _P, _P] + [_I64] * 6 + [_P, _SZ, _P]),
    "edgetok_threshold_merge": (
        ctypes.c_int,
        [ctypes.c_int, _P, _P, _P, _P, _P, _P, _P] + [_I64] * 4 + [ctypes.c_float, _I64, _P, _SZ, _P],
    ),
}
ABI_VERSION = 2  # 2: token_drop takes a workspace for its plan


def load_kernels(path: Optional[Path] = None) -> ctypes.CDLL:
    """The kernels library with its C signatures declared (raises if not built)."""
    return _load(str(path or library_path("kernels")))


@lru_cache(maxsize=None)
def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    if lib.edgetok_abi_version() != ABI_VERSION:
        raise KernelError(f"{path} has ABI {lib.edgetok_abi_version()}, expected {ABI_VERSION}; rebuild it")
    return lib


@lru_cache(maxsize=1)
def _kernels_or_none() -> Optional[ctypes.CDLL]:
    path = find_library("kernels")
    return _load(str(path)) if path else None


def _check(lib: ctypes.CDLL, rc: int, op: str) -> None:
    if rc != 0:
        raise KernelError(f"edgetok {op} kernel failed (code {rc}): {lib.edgetok_last_error().decode()}")


# --- CUDA implementations of the torch ops ---------------------------------------------


def _dtype_code(*tensors) -> Optional[int]:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        return None
    return DTYPE_CODES.get(str(next(iter(dtypes))).replace("torch.", ""))


def _stream(t) -> int:
    import torch

    return torch.cuda.current_stream(t.device).cuda_stream


def _usable(*tensors):
    """The kernels library if these CUDA tensors can use it, else None (reference fallback)."""
    lib = _kernels_or_none()
    if lib is None or _dtype_code(*tensors) is None:
        return None
    return lib


def cuda_token_merge(x, metric, size, r: int, protect_first: int):
    import torch

    from ..reduce.tome import bipartite_merge, check_merge

    b, n, c = x.shape
    check_merge(n, r, protect_first)
    lib = _usable(x, metric, size)
    if lib is None or not lib.edgetok_token_merge_supported(n, metric.shape[-1]):
        out, out_size = bipartite_merge(x, metric, size, r, protect_first)
        return (out.clone() if out is x else out), (out_size.clone() if out_size is size else out_size)
    x, metric, size = x.contiguous(), metric.contiguous(), size.contiguous()
    out = x.new_empty(b, n - r, c)
    out_size = size.new_empty(b, n - r, 1)
    ws_bytes = lib.edgetok_token_merge_workspace_size(b, n)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=x.device)
    with torch.cuda.device(x.device):
        rc = lib.edgetok_token_merge(
            _dtype_code(x), x.data_ptr(), metric.data_ptr(), size.data_ptr(), out.data_ptr(), out_size.data_ptr(),
            b, n, c, metric.shape[-1], r, protect_first, ws.data_ptr(), ws_bytes, _stream(x),
        )
    _check(lib, rc, "token_merge")
    return out, out_size


def cuda_token_drop(x, score, keep: int, protect_first: int, fuse_dropped: int):
    import torch

    from ..reduce.drop import check_keep, top_k_drop

    b, n, c = x.shape
    check_keep(n, keep, protect_first)
    lib = _usable(x, score)
    if lib is None or not lib.edgetok_token_drop_supported(n):
        out, idx = top_k_drop(x, score, keep, protect_first, bool(fuse_dropped))
        return (out.clone() if out is x else out), idx
    x, score = x.contiguous(), score.contiguous()
    fuse = int(bool(fuse_dropped))
    out = x.new_empty(b, keep + fuse, c)
    idx = torch.empty(b, keep, dtype=torch.int64, device=x.device)
    ws_bytes = lib.edgetok_token_drop_workspace_size(b, n)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=x.device)
    with torch.cuda.device(x.device):
        rc = lib.edgetok_token_drop(
            _dtype_code(x), x.data_ptr(), score.data_ptr(), out.data_ptr(), idx.data_ptr(),
            b, n, c, keep, protect_first, fuse, ws.data_ptr(), ws_bytes, _stream(x),
        )
    _check(lib, rc, "token_drop")
    return out, idx


def cuda_threshold_merge(x, metric, size, threshold: float, protect_first: int):
    import torch

    from ..reduce.dymu import threshold_merge

    b, n, c = x.shape
    lib = _usable(x, metric, size)
    if lib is None or not lib.edgetok_token_merge_supported(n, metric.shape[-1]):
        return threshold_merge(x, metric, size, threshold, protect_first)
    x, metric, size = x.contiguous(), metric.contiguous(), size.contiguous()
    # Room for the upper bound; the kernel writes [B, M, C] with M known only on the device.
    x_buf = x.new_empty(b * n * c)
    s_buf = size.new_empty(b * n)
    count = torch.empty(b, dtype=torch.int64, device=x.device)
    max_count = torch.empty(1, dtype=torch.int64, device=x.device)
    ws_bytes = lib.edgetok_threshold_merge_workspace_size(b, n)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=x.device)
    with torch.cuda.device(x.device):
        rc = lib.edgetok_threshold_merge(
            _dtype_code(x), x.data_ptr(), metric.data_ptr(), size.data_ptr(), x_buf.data_ptr(), s_buf.data_ptr(),
            count.data_ptr(), max_count.data_ptr(), b, n, c, metric.shape[-1], float(threshold), protect_first,
            ws.data_ptr(), ws_bytes, _stream(x),
        )
    _check(lib, rc, "threshold_merge")
    m = int(max_count.item()) if b else 0  # one sync, as the reference's count.max()
    return x_buf[: b * m * c].view(b, m, c), s_buf[: b * m].view(b, m, 1), count


CUDA_IMPLS = {
    "edgetok::token_merge": cuda_token_merge,
    "edgetok::token_drop": cuda_token_drop,
    "edgetok::threshold_merge": cuda_threshold_merge,
}
_registered = False


def register_cuda_kernels() -> None:
    """Give the edgetok:: ops their CUDA implementations (idempotent, loads nothing)."""
    global _registered
    if _registered:
        return
    import torch

    from . import library  # noqa: F401  (defines the ops)

    for name, fn in CUDA_IMPLS.items():
        torch.library.register_kernel(name, "cuda", fn)
    _registered = True


def info() -> dict:
    """What is built and usable here, for ``edgetok plugins info``."""
    import torch

    d = build_dir()
    libs = {kind: str(p) if (p := find_library(kind, d)) else None for kind in LIBRARIES}
    report = {
        "source_dir": str(SOURCE_DIR),
        "build_dir": str(d),
        "libraries": libs,
        "nvcc": _nvcc(),
        "cmake": shutil.which("cmake"),
        "tensorrt_python": _has_module("tensorrt"),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda_kernels_registered": _registered,
    }
    if libs["kernels"]:
        try:
            report["kernels_abi"] = load_kernels(Path(libs["kernels"])).edgetok_abi_version()
        except OSError as e:  # e.g. libcudart missing at load time
            report["kernels_load_error"] = str(e)
    return report


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
