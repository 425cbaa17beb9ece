"""Serve an export directory (or engine) through NVIDIA Triton Inference Server.

``edgetok serve DIR`` is the one-command path: PyTriton (the ``nvidia-pytriton``
wheel, which bundles a real ``tritonserver`` with its Python backend) runs
Triton, and each model instance is an edgetok runtime Session. Triton does the
dynamic batching, HTTP/gRPC, health and metrics. The model's inputs and outputs
are the ones ``edgetok triton`` writes into a model repository (model-ready
float32 NCHW in, the export's outputs out), so a client works against either.

Two things about PyTriton 0.7.0 that this module handles:
- its Python-backend stub links ``libpython3.X.so`` from the system library
  path, which need not be the interpreter running edgetok: the running
  interpreter's LIBDIR goes first on LD_LIBRARY_PATH of the server process,
  otherwise model loading fails ("'_thread.RLock' object has no attribute
  '_recursion_count'");
- its stub converts tensors to and from numpy through pybind11, and on these
  machines (numpy 2.4, and numpy 1.26 too) inputs reached the model as zeros
  and outputs came back empty (the dtype's item size read as 0). The two
  tensor crossings in the stub's proxy code go through DLPack instead (see
  ``_stub_tensor_fix``); the tests check the served outputs against a Session.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import signal
import socket
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EdgetokError, MissingDependencyError

LOG = logging.getLogger("edgetok.serve.server")
DEFAULT_PORT = 8000


class ServeError(EdgetokError, RuntimeError):
    """The model cannot be served as asked."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = DEFAULT_PORT  # HTTP
    grpc_port: Optional[int] = None  # default: port + 1
    metrics_port: Optional[int] = None  # default: port + 2
    max_batch: int = 8
    instances: int = 1
    backend: Optional[str] = None  # runtime backend; None picks the best available
    queue_delay_us: int = 100  # how long Triton may hold a request to form a larger batch
    name: Optional[str] = None  # model name (default: the export's, as `edgetok triton` names it)
    threads: Optional[int] = None  # intra-op threads per instance (ORT)
    exit_timeout_s: int = 5
    log_file: Optional[str] = None  # Triton's log (None: to stdout)

    def ports(self) -> tuple[int, int, int]:
        return (self.port, self.grpc_port or self.port + 1, self.metrics_port or self.port + 2)


def _import_pytriton():
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "serving needs PyTriton: pip install 'edgetok[serve]' (nvidia-pytriton, Linux x86-64/aarch64)"
        ) from None


def model_name(art, name: Optional[str] = None) -> str:
    """The name `edgetok triton` gives the model, restricted to what Triton accepts."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name or art.name.replace("/", "_"))


def _np_dtype(dtype: str):
    try:
        return np.dtype(dtype).type
    except TypeError:
        raise ServeError(f"tensor dtype {dtype} cannot be served through Triton") from None


def _dims(spec, batched: bool) -> tuple:
    dims = spec.shape[1:] if batched else spec.shape
    return tuple(d if isinstance(d, int) else -1 for d in dims)


class Server:
    """Sessions for ``path`` behind a PyTriton server. ``start()`` returns once the model is ready.

    Loading happens in the constructor, so a missing or corrupt model fails before
    any port is opened. ``batch_sizes`` counts the batches Triton formed.
    """

    def __init__(self, path, config: Optional[ServeConfig] = None, **options):
        from .. import runtime as rt

        self.config = config or ServeConfig()
        if self.config.instances < 1 or self.config.max_batch < 1:
            raise ServeError("--instances and --max-batch must be at least 1")
        _import_pytriton()
        if not Path(path).exists():
            raise ServeError(f"{path} does not exist; pass an export directory (edgetok export) or an engine")
        try:
            art = rt.resolve(path)
            self.sessions = [
                rt.load(path, backend=self.config.backend, preprocess=False, threads=self.config.threads, **options)
                for _ in range(self.config.instances)
            ]
            outputs = art.outputs()
        except (EdgetokError, OSError) as e:
            raise ServeError(f"cannot serve {path}: {e}") from None
        sess = self.sessions[0]
        self.path, self.artifacts, self.name = Path(path), art, model_name(art, self.config.name)
        self.input, self.outputs = sess.input, [o for o in outputs if o.name in sess.output_names]
        self.batched = self.input.batch_dynamic
        if any(not isinstance(d, int) for d in self.input.shape[1:]):
            raise ServeError(f"{path}: input shape {self.input.shape} is dynamic besides the batch; export a fixed image size")
        prof = (art.engine_manifest.get("inputs") or [{}])[0].get("profile") if sess.backend == "trt" else None
        if prof and self.config.max_batch > prof["max"][0]:
            raise ServeError(f"--max-batch {self.config.max_batch} exceeds the engine's profile max {prof['max'][0]}; "
                             "lower it or rebuild the engine with a larger profile")
        self.batch_sizes: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._triton = None
        self._stop = threading.Event()

    # -- inference -------------------------------------------------------------
    def _infer_fn(self, session):
        from pytriton.decorators import batch

        out_types = {o.name: _np_dtype(o.dtype) for o in self.outputs}

        @batch
        def infer(**inputs):
            x = np.ascontiguousarray(inputs[self.input.name], dtype=np.float32)
            with self._lock:
                self.batch_sizes[len(x)] += 1
            out = session.run_prepared(x)  # raises a one-line EdgetokError, which Triton returns to the client
            return {k: np.ascontiguousarray(out[k], dtype=t) for k, t in out_types.items()}

        return infer

    # -- life cycle --------------------------------------------------------------
    def start(self) -> "Server":
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        if self._triton is not None:  # already serving
            return self
        _server_library_path()
        _stub_tensor_fix()
        http, grpc, metrics = self.config.ports()
        host = self.config.host
        cfg = TritonConfig(http_address=host, grpc_address=host, metrics_address=host, http_port=http,
                           grpc_port=grpc, metrics_port=metrics, exit_timeout_secs=self.config.exit_timeout_s,
                           log_file=self.config.log_file, allow_gpu_metrics=False)
        for port in (http, grpc, metrics):
            _check_port_free(host, port)
        triton = Triton(config=cfg)
        batched = self.batched
        mcfg = ModelConfig(
            batching=batched, max_batch_size=self.config.max_batch if batched else 0,
            batcher=DynamicBatcher(max_queue_delay_microseconds=self.config.queue_delay_us),
        )
        triton.bind(
            model_name=self.name,
            infer_func=[self._infer_fn(s) for s in self.sessions],
            inputs=[Tensor(name=self.input.name, dtype=np.float32, shape=_dims(self.input, batched))],
            outputs=[Tensor(name=o.name, dtype=_np_dtype(o.dtype), shape=_dims(o, batched)) for o in self.outputs],
            config=mcfg,
            strict=True,
        )
        self._triton = triton
        try:
            triton.run()
        except Exception as e:
            self.stop()
            raise ServeError(f"Triton did not start: {e}") from None
        return self

    @property
    def urls(self) -> dict:
        http, grpc, metrics = self.config.ports()
        h = self.config.host
        return {"http": f"{h}:{http}", "grpc": f"{h}:{grpc}", "metrics": f"http://{h}:{metrics}/metrics"}

    @property
    def access_token(self) -> Optional[str]:
        """Token for Triton's protected endpoints (statistics, repository control)."""
        return self._triton.get_access_token() if self._triton else None

    def serve_forever(self) -> None:
        """Block until SIGINT/SIGTERM (or Triton exits), then stop gracefully."""
        previous = {s: signal.signal(s, lambda *_: self._stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stop.wait(1.0):
                if self._triton is None or not self._triton.is_alive():
                    raise ServeError("Triton exited unexpectedly; see its log above")
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._triton is not None:
            self._triton.stop()
            self._triton = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"cannot bind {host}:{port} ({e.strerror}); pick other ports with --port") from None


def _server_library_path() -> None:
    """Put this interpreter's libpython first for the Python-backend stub (the server inherits os.environ)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and (not parts or parts[0] != libdir):
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *[p for p in parts if p != libdir]])


# The stub-side proxy code PyTriton 0.7.0 ships, and the DLPack crossings used instead
# (a torch capsule for outputs: the stub rejects numpy's own capsule).
_STUB_FIXES = {
    "request[input_name] = input_tensor.as_numpy()": "request[input_name] = np.from_dlpack(input_tensor).copy()",
    "pb_utils.Tensor(name, value)\n": "_tensor_from_numpy(name, value)\n",
    "import typing\n": (
        "import typing\n\nimport numpy as np\n\n\n"
        "def _tensor_from_numpy(name, value):  # edgetok: DLPack crossing (see edgetok/serve.py)\n"
        "    import torch\n\n"
        "    t = torch.from_numpy(np.ascontiguousarray(value))\n"
        "    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(t))\n"
    ),
}


def _stub_tensor_fix() -> None:
    from pytriton.models import model as pm

    if getattr(pm.Model, "_edgetok_tensor_fix", False):
        return
    original = pm.Model.get_proxy_model_files

    def get_proxy_model_files(self):
        files = original(self)
        key = f"file:{self.model_version}/model.py"
        src = files[key].decode()
        for old, new in _STUB_FIXES.items():
            if old not in src:
                raise ServeError("this PyTriton's stub code differs from 0.7.0; install nvidia-pytriton==0.7.0")
            src = src.replace(old, new, 1)
        files[key] = src.encode()
        return files

    pm.Model.get_proxy_model_files = get_proxy_model_files
    pm.Model._edgetok_tensor_fix = True
