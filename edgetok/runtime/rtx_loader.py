"""TensorRT-RTX's pip wheels and the dynamic loader: the fix they need before the
parser can add any plugin layer, C++ or Python (edgetok/trt/pyplugins.py holds the
build-time plugin stand-ins; docs/trt_plugins_rtx.md the investigation).

The loader defect. When TensorRT-RTX 1.7's ONNX parser adds a plugin layer, it does not
call ``INetworkDefinition::addPluginV3``. It ``dlopen``s the library by its unversioned
development name ``libtensorrt_rtx.so`` once, looks up ``getPrivateApi_INTERNAL`` and adds
the layer through that. The pip wheel tensorrt-rtx-cu12-libs ships only
``libtensorrt_rtx.so.1``, so the ``dlopen`` fails. The parser throws std::runtime_error
("Unable to open library: libtensorrt_rtx.so ...") inside a noexcept path, and the
process dies with "terminate called without an active exception". This happens right
after the creator's createPlugin returns, for C++ and Python plugins alike. The parser
looks for that name in its own directory first (RPATH ``$ORIGIN``), then
LD_LIBRARY_PATH, the ld.so cache and the system directories. Any one of these fixes it:

- a link ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` in the wheel's
  ``tensorrt_rtx_libs`` directory (permanent; an SDK install's lib/ normally has it);
- ``loader_env()``: LD_LIBRARY_PATH naming a directory that holds the link, for a child
  process (the dynamic loader reads LD_LIBRARY_PATH only when a process starts);
- ``prepare_loader()``, in this process, before ``tensorrt_rtx_bindings`` (or
  ``tensorrt_rtx_libs``) is imported: it loads the parser library from a directory of
  links that also holds ``libtensorrt_rtx.so``, so ``$ORIGIN`` resolves there.

``register()`` does ``prepare_loader()`` when it imports TensorRT-RTX itself. It raises
PluginLoaderError, instead of letting the parser abort the process, when the name still
does not resolve.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import EdgetokError

PARSER_DLOPENS = "libtensorrt_rtx.so"  # the name TensorRT-RTX's parser dlopens to add a plugin layer
_LIBS_PACKAGE = "tensorrt_rtx_libs"
_PARSER_LIB = "libtensorrt_onnxparser_rtx.so.1"
_CORE_LIB = "libtensorrt_rtx.so.1"
_RTX_MODULE = "tensorrt_rtx_bindings"
_RTLD_DI_ORIGIN = 6  # <dlfcn.h>


class PluginLoaderError(EdgetokError, RuntimeError):
    """TensorRT-RTX's parser could not add a plugin layer in this process (it would abort)."""


# --------------------------------------------------------------------------------------
# The loader fix
# --------------------------------------------------------------------------------------


def wheel_lib_dir() -> Optional[Path]:
    """The directory of the TensorRT-RTX libraries wheel (tensorrt_rtx_libs), found without importing it."""
    spec = importlib.util.find_spec(_LIBS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _dl(name: str):
    for lib in (None, "libdl.so.2"):
        try:
            fn = getattr(ctypes.CDLL(lib), name)
        except (OSError, AttributeError):
            continue
        return fn
    return None


def _loaded_origin(soname: str) -> Optional[Path]:
    """$ORIGIN of an already loaded library (the directory it was loaded through), or None."""
    try:
        handle = ctypes.CDLL(soname, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)._handle
    except OSError:
        return None
    dlinfo = _dl("dlinfo")
    if dlinfo is None:
        return None
    buf = ctypes.create_string_buffer(4096)
    dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    if dlinfo(ctypes.c_void_p(handle), _RTLD_DI_ORIGIN, buf) != 0:
        return None
    return Path(buf.value.decode())


def _initial_ld_library_path() -> str:
    """LD_LIBRARY_PATH as this process started (what the dynamic loader uses)."""
    try:
        env = Path("/proc/self/environ").read_bytes().split(b"\0")
        for item in env:
            if item.startswith(b"LD_LIBRARY_PATH="):
                return item.split(b"=", 1)[1].decode(errors="replace")
        return ""
    except OSError:
        return os.environ.get("LD_LIBRARY_PATH", "")


def _ld_cache_entry(name: str) -> Optional[Path]:
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if ldconfig is None:
        return None
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        left, _, right = line.partition("=>")
        if left.strip().split(" ")[0] == name and right.strip():
            return Path(right.strip())
    return None


def _resolve_unversioned() -> tuple[Optional[Path], Optional[Path]]:
    """(where the parser's dlopen of libtensorrt_rtx.so would land or None, the parser's $ORIGIN)."""
    origin = _loaded_origin(_PARSER_LIB) or wheel_lib_dir()
    dirs = [origin] if origin else []
    dirs += [Path(p) for p in _initial_ld_library_path().split(":") if p]
    for d in dirs:
        if (d / PARSER_DLOPENS).exists():
            return d / PARSER_DLOPENS, origin
    cached = _ld_cache_entry(PARSER_DLOPENS)
    if cached is not None and cached.exists():
        return cached, origin
    for d in ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"):
        if (Path(d) / PARSER_DLOPENS).exists():
            return Path(d) / PARSER_DLOPENS, origin
    return None, origin


def loader_problem() -> Optional[str]:
    """Why TensorRT-RTX's parser would abort this process on a plugin node, or None if it will not.
    (Also true for the C++ plugin library; standard TensorRT's parser is not affected.)"""
    if sys.platform != "linux":
        return None  # the defect was seen with the Linux wheels; elsewhere nothing is checked
    found, origin = _resolve_unversioned()
    core = (origin / _CORE_LIB) if origin else None
    if found is not None:
        if core is not None and core.exists() and os.path.realpath(found) != os.path.realpath(core):
            return (f"{PARSER_DLOPENS} resolves to {os.path.realpath(found)}, not to the TensorRT-RTX library this "
                    f"process uses ({os.path.realpath(core)}); the parser would add plugin layers through another "
                    "build's private API")
        return None
    return (f"TensorRT-RTX's ONNX parser dlopens {PARSER_DLOPENS} (unversioned) to add a plugin layer and aborts "
            f"the process ('terminate called without an active exception') when that fails; the wheel in "
            f"{origin or '<tensorrt_rtx_libs not found>'} ships only {_CORE_LIB}. Fix: "
            f"`ln -s {_CORE_LIB} {origin or '<tensorrt_rtx_libs>'}/{PARSER_DLOPENS}`, or start the process with "
            "edgetok.runtime.rtx_loader.loader_env(), or call edgetok.runtime.rtx_loader.prepare_loader() before "
            f"{_RTX_MODULE} is imported")


def link_dir(directory: Optional[os.PathLike] = None) -> Path:
    """A directory of links into the wheel: the parser library, and libtensorrt_rtx.so -> libtensorrt_rtx.so.1."""
    src = wheel_lib_dir()
    if src is None or not (src / _CORE_LIB).exists():
        raise PluginLoaderError(f"cannot find the TensorRT-RTX libraries wheel ({_LIBS_PACKAGE} with {_CORE_LIB}); "
                                "install tensorrt-rtx-cu12-libs")
    if directory is None:
        tag = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:12]
        directory = Path(tempfile.gettempdir()) / f"edgetok-rtx-loader-{os.getuid()}" / tag
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, target in ((_PARSER_LIB, src / _PARSER_LIB), (_CORE_LIB, src / _CORE_LIB),
                         (PARSER_DLOPENS, src / _CORE_LIB)):
        link = d / name
        if link.is_symlink() and os.readlink(link) == str(target):
            continue
        tmp = d / f".{name}.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return d


def loader_env(env: Optional[dict] = None, directory: Optional[os.PathLike] = None) -> dict:
    """``env`` (default: os.environ) with LD_LIBRARY_PATH led by a directory holding libtensorrt_rtx.so,
    for a child process that builds with plugins under TensorRT-RTX."""
    out = dict(os.environ if env is None else env)
    d = str(link_dir(directory))
    rest = [p for p in out.get("LD_LIBRARY_PATH", "").split(":") if p and p != d]
    out["LD_LIBRARY_PATH"] = ":".join([d, *rest])
    return out


def prepare_loader(directory: Optional[os.PathLike] = None) -> Optional[Path]:
    """Make libtensorrt_rtx.so resolvable for TensorRT-RTX's parser in this process: load the parser
    library through a directory of links (its $ORIGIN) that holds it. Must run before
    tensorrt_rtx_bindings or tensorrt_rtx_libs is imported. -> the directory used, or None when
    nothing was needed. Raises PluginLoaderError when it is too late or does not help."""
    if loader_problem() is None:
        return None
    if _loaded_origin(_PARSER_LIB) is not None:
        raise PluginLoaderError(loader_problem() + f" ({_RTX_MODULE} is already imported, so prepare_loader() "
                                "comes too late in this process)")
    d = link_dir(directory)
    ctypes.CDLL(str(d / _PARSER_LIB), mode=os.RTLD_GLOBAL)
    problem = loader_problem()
    if problem is not None:
        raise PluginLoaderError(problem)
    return d


