"""Runtime backends behind one interface (Polygraphy-style runners), and the one
place edgetok creates an ONNX Runtime session (``ort_session``).

A backend knows whether it can run here (``unavailable()`` returns the reason
it cannot, or None) and opens a Runner for some artifacts. A Runner runs one
float32 NCHW batch, plus any further named inputs (``infer(x, **state)``: a
streaming step's previous-frame tokens), and returns {output name: numpy
array}; ``sync()`` waits for the device so timings are honest. Heavy
dependencies are imported on use.

ONNX Runtime sessions need care when they take turns: each session owns an
intra-op thread pool whose threads spin for a while after a run, and on a
small machine the idle session's spinning threads take the cores from the
session being timed (measured here, 2 cores, ViT-Ti/16 batch 1: 14 ms alone,
25-30 ms when two sessions alternate). ``ort_session_options`` is the one place
edgetok sets session threads: sessions that alternate turn spinning off, and a
benchmark process can instead give all its sessions one shared pool
(``share_ort_threads``), which keeps spinning and costs alternating sessions
almost nothing (15 ms against 14 ms alone in the same measurement).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EdgetokError, InputShapeError, MissingDependencyError
from .artifacts import Artifacts, TensorSpec


class BackendError(EdgetokError, RuntimeError):
    """A backend cannot run these artifacts here."""


# -- ONNX Runtime sessions ---------------------------------------------------------
_SHARED_ORT_THREADS: Optional[int] = None


def share_ort_threads(threads: int) -> None:
    """Give every ONNX Runtime session edgetok creates from now on one process-wide
    intra-op pool of ``threads`` threads. ONNX Runtime then refuses sessions that ask
    for their own pool, so call this only in processes whose sessions all come from
    edgetok (the benchmark scripts), before their first session."""
    global _SHARED_ORT_THREADS
    import onnxruntime.capi._pybind_state as C

    C.set_global_thread_pool_sizes(int(threads), 1)
    _SHARED_ORT_THREADS = int(threads)


def ort_threading() -> str:
    """How this process's sessions are threaded (recorded next to ORT timings)."""
    if _SHARED_ORT_THREADS:
        return f"one shared pool of {_SHARED_ORT_THREADS} threads"
    return "a pool per session (spinning off where sessions alternate)"


def ort_session_options(threads: Optional[int] = None, interleaved: bool = False):
    """SessionOptions for every session edgetok creates. ``interleaved``: this session
    takes turns with others in one timing loop, so its idle threads must not spin."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if _SHARED_ORT_THREADS:
        opts.use_per_session_threads = False
        return opts
    if threads:
        opts.intra_op_num_threads = int(threads)
    if interleaved:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def ort_session(model, providers=("CPUExecutionProvider",), threads: Optional[int] = None,
                interleaved: bool = False, optimize: bool = True):
    """An ONNX Runtime InferenceSession of ``model`` (a path, serialized bytes or a ModelProto), the
    only way edgetok makes one. ``optimize=False``: no graph fusions (an exact reference)."""
    import onnxruntime as ort

    opts = ort_session_options(threads, interleaved)
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else (
        model if isinstance(model, (bytes, bytearray)) else str(model))
    try:
        return ort.InferenceSession(src, opts, providers=list(providers))
    except Exception as e:  # ORT raises its own exception types
        where = model if isinstance(model, (str, Path)) else "the model"
        raise BackendError(f"ONNX Runtime cannot load {where}: {str(e).splitlines()[0]}") from None


class Runner:
    input: TensorSpec
    output_names: list[str]
    backend: str = ""

    def infer(self, x: np.ndarray, **state: np.ndarray) -> dict[str, np.ndarray]:
        """``state``: further named inputs (a streaming step's previous-frame tokens)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for queued device work (no-op on CPU)."""

    def check(self, x: np.ndarray) -> None:
        want = self.input.shape
        ok = x.ndim == len(want) and all(not isinstance(d, int) or d == s for d, s in zip(want, x.shape))
        if not ok:
            raise InputShapeError(
                f"input {self.input.name} must have shape {want} ({self.backend}), got {list(x.shape)}; "
                "resize the images to the model's size or use session.run() with preprocessing"
            )


class Backend:
    name = ""

    def unavailable(self, art: Optional[Artifacts] = None) -> Optional[str]:
        raise NotImplementedError

    def open(self, art: Artifacts, **options) -> Runner:
        raise NotImplementedError


# -- ONNX Runtime --------------------------------------------------------------
class OrtRunner(Runner):
    def __init__(self, onnx: Path, providers: list, backend: str, threads: Optional[int] = None,
                 interleaved: bool = False):
        self.sess = ort_session(onnx, providers, threads, interleaved)
        i = self.sess.get_inputs()[0]
        self.input = TensorSpec(i.name, [d if isinstance(d, int) else "batch" for d in i.shape])
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.backend = backend

    def infer(self, x, **state):
        self.check(x)
        return dict(zip(self.output_names, self.sess.run(self.output_names, {self.input.name: x, **state})))


class OrtCpu(Backend):
    name = "ort-cpu"

    def unavailable(self, art=None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime)"
        if art is not None and art.onnx is None:
            return f"{art.root} has no ONNX model"
        if art is not None and art.manifest is not None and art.manifest.plugin_ops and \
                set(art.manifest.plugin_ops) - set(art.manifest.function_bodies):
            return (f"{art.onnx} is a '{art.manifest.target}' export: its {', '.join(art.manifest.plugin_ops)} nodes "
                    "have no standard-op body, only a TensorRT plugin; re-export with --target portable to run it "
                    "in ONNX Runtime, or build it with `edgetok build`")
        return None

    def open(self, art, threads=None, interleaved=False, **_):
        return OrtRunner(art.onnx, ["CPUExecutionProvider"], self.name, threads, interleaved)


class OrtCuda(OrtCpu):
    name = "ort-cuda"

    def unavailable(self, art=None):
        reason = super().unavailable(art)
        if reason:
            return reason
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
        return None

    def open(self, art, threads=None, interleaved=False, **_):
        return OrtRunner(art.onnx, ["CUDAExecutionProvider", "CPUExecutionProvider"], self.name, threads, interleaved)


# -- TensorRT --------------------------------------------------------------------
class TrtRunner(Runner):
    """Runs a serialized engine with torch-allocated CUDA buffers."""

    backend = "trt"

    def __init__(self, art: Artifacts, plugin_lib=None):
        import torch

        from .env import gpu_info, import_tensorrt, plugin_library, tensorrt_version
        from .engines import check_engine, load_manifest

        manifest = load_manifest(art.engine)
        check_engine(manifest, art.engine, gpu_info(), tensorrt_version())
        trt = import_tensorrt()
        logger = trt.Logger(trt.Logger.WARNING)
        if manifest.get("needs_plugin") or manifest.get("plugin"):
            lib = plugin_library(plugin_lib or (manifest.get("plugin") or {}).get("path"))
            trt.get_plugin_registry().load_library(str(lib))
        engine = trt.Runtime(logger).deserialize_cuda_engine(art.engine.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT could not deserialize {art.engine}; rebuild it with `edgetok build`")
        self.trt, self.torch, self.engine = trt, torch, engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in inputs]
        spec = manifest["inputs"][0]
        self.input = TensorSpec(inputs[0], list(spec["shape"]))
        self.state_inputs = inputs[1:]  # a streaming step's state (previous-frame tokens)
        self.profile = spec.get("profile")
        self.stream = torch.cuda.Stream()

    def infer(self, x, **state):
        self.check(x)
        if self.profile and not (self.profile["min"][0] <= x.shape[0] <= self.profile["max"][0]):
            raise InputShapeError(
                f"batch {x.shape[0]} is outside the engine's profile {self.profile['min'][0]}..{self.profile['max'][0]}; "
                "rebuild with a config whose batch profile covers it"
            )
        missing = [n for n in self.state_inputs if n not in state]
        if missing or set(state) - set(self.state_inputs):
            raise InputShapeError(f"the engine takes inputs {[self.input.name, *self.state_inputs]}; got "
                                  f"{[self.input.name, *state]}")
        torch = self.torch
        feeds = {self.input.name: torch.from_numpy(np.ascontiguousarray(x)).cuda()}
        feeds |= {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in state.items()}
        for name, t in feeds.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}

    def sync(self):
        self.stream.synchronize()


class Trt(Backend):
    name = "trt"

    def unavailable(self, art=None):
        from .env import gpu_info, tensorrt_version

        if tensorrt_version() is None:
            return "TensorRT is not installed"
        if gpu_info() is None:
            return "no CUDA GPU is visible"
        if art is not None and art.engine is None:
            return f"{art.root} has no engine; build one with `edgetok build`"
        return None

    def open(self, art, plugin_lib=None, **_):
        return TrtRunner(art, plugin_lib)


# -- torch -----------------------------------------------------------------------
class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, module, input_spec: TensorSpec, output_names: list[str], device: str = "cpu"):
        import torch

        self.torch, self.module, self.device = torch, module.eval().to(device), device
        self.input, self.output_names = input_spec, output_names

    def infer(self, x, **state):
        """``state``: further named inputs, passed to the module by name (a DTD step's prev_tokens)."""
        self.check(x)
        torch = self.torch
        kwargs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in state.items()}
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x).to(self.device), **kwargs)
        if isinstance(out, dict):
            return {k: v.detach().cpu().numpy() for k, v in out.items()}
        outs = out if isinstance(out, (tuple, list)) else [out]
        names = self.output_names if len(self.output_names) == len(outs) else [f"output{i}" for i in range(len(outs))]
        return {n: o.detach().float().cpu().numpy() for n, o in zip(names, outs)}

    def sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()


TORCH_FILES = ("model.pt2", "model.pt")


def load_torch_module(path: Path):
    """An nn.Module from a torch.export program (.pt2) or a pickled module (.pt)."""
    import torch

    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()
    module = torch.load(str(path), weights_only=False, map_location="cpu")
    if not isinstance(module, torch.nn.Module):
        raise BackendError(f"{path} holds a {type(module).__name__}, not a model; save the nn.Module itself")
    return module


class Torch(Backend):
    name = "torch"

    def unavailable(self, art=None):
        if art is not None and not any((art.root / f).exists() for f in TORCH_FILES):
            return f"{art.root} has no torch model ({' or '.join(TORCH_FILES)}); pass the nn.Module to edgetok.runtime.load"
        return None

    def open(self, art, module=None, device="cpu", **_):
        if module is None:
            module = load_torch_module(next(art.root / f for f in TORCH_FILES if (art.root / f).exists()))
        spec = art.inputs()[0]
        return TorchRunner(module, spec, [o.name for o in art.outputs()], device)


from .openvino import OPENVINO_BACKENDS  # noqa: E402  (after Backend/Runner: openvino.py subclasses them)

BACKENDS: dict[str, Backend] = {b.name: b for b in (Trt(), OrtCuda(), OrtCpu(), Torch(), *OPENVINO_BACKENDS)}
PREFERENCE = ("trt", "ort-cuda", "ort-cpu")  # best first; torch only when asked


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def pick_backend(art: Artifacts) -> Backend:
    """The best backend that can run ``art`` here: TensorRT engine > ORT CUDA > ORT CPU."""
    reasons = []
    for name in PREFERENCE:
        reason = BACKENDS[name].unavailable(art)
        if reason is None:
            return BACKENDS[name]
        reasons.append(f"{name}: {reason}")
    raise MissingDependencyError("no backend can run this model here (" + "; ".join(reasons) + ")")
