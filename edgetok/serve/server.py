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

Start-up on a busy machine (``ServeConfig.startup_timeout_s``, ``--startup-timeout``):
PyTriton 0.7.0 bounds the model's start with fixed timeouts that a saturated CPU
exceeds. The one that failed is the Python-backend stub's handshake: with
``--instances 2`` Triton initializes both instances in parallel, instance 1's stub
waits for the config socket instance 0's stub creates, and gives up after 1 s
(``get_config_from_handshake_server(..., timeout_s=1.0)`` in the stub's
``model.py``: "TimeoutError: Timeout occurred while waiting for config file").
The others: the same handshake on the server side (``Model.setup``), the stub's
request server start (``_STARTUP_TIMEOUT_S = 1.0``), the HTTP load request
(``DEFAULT_INFERENCE_TIMEOUT_S = 60``) and the server-ready wait
(``DEFAULT_TRITON_STARTUP_TIMEOUT_S = 120``). ``start()`` raises them all to the
start-up timeout (in the stub code it ships, and around ``connect()`` in this
process), waits for Triton itself (failing at once when ``tritonserver`` exits), and
bounds the whole start with one deadline. A launch that fails for a cause that can
pass (a port taken between the check and Triton's bind, a handshake timeout, an
unhealthy stub) is relaunched once; any failure is one line naming the cause from
Triton's log, and leaves no ``tritonserver``, stub process, port or shared memory
behind (``_reap``).
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sysconfig
import threading
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EdgetokError, MissingDependencyError

LOG = logging.getLogger("edgetok.serve.server")
DEFAULT_PORT = 8000
DEFAULT_STARTUP_TIMEOUT_S = 300.0  # generous: a 2-core machine saturated by other jobs needs tens of seconds


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
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S  # how long start() waits for Triton and the model

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
        if not self.config.startup_timeout_s > 0:
            raise ServeError("--startup-timeout must be positive (seconds)")
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
        self.startup_s: Optional[float] = None  # how long the last start() took
        self.launches = 0  # Triton launches by the last start() (2: relaunched once)
        self._log_offset = 0

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
        """Launch Triton and return once the model is ready (within ``config.startup_timeout_s``).

        A launch that fails for a cause that can pass is relaunched once (with the full
        timeout again); otherwise, or when the relaunch fails too, a one-line ServeError
        names the cause from Triton's log. Nothing is left running after a failure.
        """
        if self._triton is not None:  # already serving
            return self
        _import_pytriton()
        _server_library_path()
        _stub_tensor_fix()
        http, grpc, metrics = self.config.ports()
        t0 = time.monotonic()
        with _START_LOCK:  # the PyTriton timeouts below are process-wide while a start is under way
            for attempt in (1, 2):
                for port in (http, grpc, metrics):
                    _check_port_free(self.config.host, port)
                self.launches = attempt
                try:
                    self._launch(time.monotonic() + self.config.startup_timeout_s)
                    break
                except _StartFailure as f:
                    if attempt == 1 and f.retryable:
                        LOG.warning("Triton did not start (%s); launching it once more", f.cause)
                        continue
                    raise ServeError(f.message(self.config, relaunched=attempt > 1)) from None
        self.startup_s = time.monotonic() - t0
        return self

    def _triton_config(self):
        from pytriton.triton import TritonConfig

        http, grpc, metrics = self.config.ports()
        host = self.config.host
        return TritonConfig(http_address=host, grpc_address=host, metrics_address=host, http_port=http,
                            grpc_port=grpc, metrics_port=metrics, exit_timeout_secs=self.config.exit_timeout_s,
                            log_file=self.config.log_file, allow_gpu_metrics=False)

    def _bind(self, triton) -> None:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

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

    def _launch(self, deadline: float) -> None:
        """One launch: tritonserver up (or exited), then the model loaded, all before ``deadline``."""
        from pytriton.triton import Triton

        timeout = self.config.startup_timeout_s
        triton = Triton(config=self._triton_config())
        if not all(hasattr(triton, a) for a in ("_run_server", "_triton_server", "_python_backend_config")):
            raise ServeError("this PyTriton differs from 0.7.0; install nvidia-pytriton==0.7.0")
        self._bind(triton)
        self._triton = triton
        offset = self._log_offset = _size(self.config.log_file)  # an appended log file: read this launch's part
        timed_out, at_deadline = threading.Event(), []
        quiet = logging.getLogger("pytriton.client.utils")

        def abort():  # the deadline passed: keep the log as it was (the cause), then stop tritonserver
            at_deadline.append(self._triton_log(triton, offset))
            quiet.disabled = True  # its readiness poll logs a traceback for the connection the stop closes
            _abort_launch(triton, timed_out)

        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), abort)
        watchdog.daemon = True
        try:
            with _pytriton_timeouts(deadline, timeout):
                triton._run_server()  # PyTriton 0.7.0: Triton.run() is _run_server() + connect()
                self._wait_server(triton, deadline)
                watchdog.start()
                triton.connect()  # loads the model (Triton's load request), then the handshake with its stubs
            if timed_out.is_set() or not triton._triton_server.is_alive():
                raise RuntimeError("tritonserver exited")
        except BaseException as e:  # KeyboardInterrupt too: never leave Triton behind
            watchdog.cancel()
            if watchdog.ident is not None:
                watchdog.join()  # an abort under way finishes first
            log = at_deadline[0] if at_deadline else self._triton_log(triton, offset)
            self._triton = None
            _shutdown(triton)
            if not isinstance(e, Exception) or isinstance(e, ServeError):
                raise
            if isinstance(e, _StartFailure):
                e.cause = e.cause or _triton_cause(log, last_resort=True)
                raise
            late = timed_out.is_set() or time.monotonic() >= deadline
            cause = _triton_cause(log, last_resort=late)
            if cause is None:  # Triton's log says nothing: PyTriton's exception, marked as such
                cause = _one_line(f"PyTriton: {type(e).__name__}: {e}")
            raise _StartFailure(cause, timed_out=late, timeout=timeout) from None
        finally:
            watchdog.cancel()
            quiet.disabled = False

    def _wait_server(self, triton, deadline: float) -> None:
        """Wait for Triton's HTTP endpoint, failing at once if tritonserver exits (PyTriton would poll on)."""
        http = self.config.ports()[0]
        host = self.config.host if self.config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{http}/v2/health/live"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP proxy for our own server
        while True:
            if not triton._triton_server.is_alive():
                raise _StartFailure(None)
            try:
                with opener.open(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise _StartFailure(None, timed_out=True, timeout=self.config.startup_timeout_s)
            time.sleep(0.2)

    def _triton_log(self, triton, offset: int = 0) -> str:
        """Triton's log of this launch: its log file (``--log-file``, from ``offset``) and what tritonserver printed."""
        text = ""
        if self.config.log_file:
            try:
                with open(self.config.log_file, "rb") as f:
                    f.seek(offset if offset <= _size(self.config.log_file) else 0)
                    text = f.read().decode(errors="replace")
            except OSError:
                pass
        server = getattr(triton, "_triton_server", None)
        return text + "\n" + (server.logs() if server is not None else "")

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
                    cause = _triton_cause(self._triton_log(self._triton, self._log_offset)) if self._triton else None
                    raise ServeError(f"Triton exited unexpectedly (Triton: {cause})" if cause else
                                     "Triton exited unexpectedly; see its log above")
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self.stop()

    def stop(self) -> None:
        """Stop Triton (in-flight requests get ``exit_timeout_s``) and reap what it leaves behind."""
        self._stop.set()
        triton, self._triton = self._triton, None
        if triton is not None:
            _shutdown(triton)

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


# -- start-up: timeouts, failure causes, clean-up ------------------------------------------------------------------

_START_LOCK = threading.Lock()
_STUB_TIMEOUT_S = 1.0  # the stub-side waits of the launch under way (PyTriton 0.7.0: 1 s), set by _pytriton_timeouts
_SLACK_S = 30.0  # PyTriton's own waits end this long after the start deadline, so the deadline decides
# causes that can pass: a port taken between our check and Triton's bind, the stubs' handshake, a stub's health check
_RETRYABLE = re.compile(r"already in use|waiting for config file|not healthy", re.IGNORECASE)
_BUSY = re.compile(r"waiting for config file|not healthy|timeout", re.IGNORECASE)


class _StartFailure(Exception):
    """One launch failed; ``cause`` is the line from Triton's log that says why (None: it said nothing)."""

    def __init__(self, cause: Optional[str], timed_out: bool = False, timeout: Optional[float] = None):
        super().__init__(cause)
        self.cause, self.timed_out, self.timeout = cause, timed_out, timeout

    @property
    def retryable(self) -> bool:
        return not self.timed_out and bool(self.cause and _RETRYABLE.search(self.cause))

    def message(self, config: ServeConfig, relaunched: bool) -> str:
        said = " (nothing in Triton's log)" if not self.cause else (
            f" ({self.cause})" if self.cause.startswith("PyTriton:") else f" (Triton: {self.cause})")
        again = "; relaunched once, failed again" if relaunched else ""
        if self.timed_out:
            return (f"the model did not start within {config.startup_timeout_s:g} s{said}{again}; "
                    "raise --startup-timeout or free the CPU")
        if self.cause and "already in use" in self.cause:
            return f"Triton did not start{said}{again}; pick other ports with --port"
        if self.cause and _BUSY.search(self.cause):
            return f"Triton did not start{said}{again}; raise --startup-timeout or free the CPU"
        return f"Triton did not start{said}{again}"


@contextlib.contextmanager
def _pytriton_timeouts(deadline: float, timeout: float):
    """PyTriton 0.7.0's start-up waits, raised for one launch (restored after it).

    In this process: the server-ready waits (120 s), the HTTP model-load request (60 s) and the
    model-ready wait (60 s) end _SLACK_S after the deadline (so the watchdog's stop decides), the
    server side of the stubs' config handshake (1 s) with it. In the stubs: the handshake and the
    request server's start wait ``timeout`` (written into the stub code, see _stub_fixes).
    """
    import pytriton.client.client as pc
    import pytriton.models.manager as pmm
    import pytriton.triton as pt
    from pytriton.client.warnings import NotSupportedTimeoutWarning
    from pytriton.models import model as pm

    global _STUB_TIMEOUT_S
    left = max(1.0, deadline - time.monotonic()) + _SLACK_S
    handshake = pm.get_config_from_handshake_server

    def get_config_from_handshake_server(socket_path, timeout_s: float = 1.0):  # retried as in the stubs
        while True:
            try:
                return handshake(socket_path, timeout_s=max(timeout_s, deadline - time.monotonic()))
            except _HANDSHAKE_RETRY:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    saved = [(pt, "DEFAULT_TRITON_STARTUP_TIMEOUT_S", left), (pmm, "DEFAULT_TRITON_STARTUP_TIMEOUT_S", left),
             (pt, "WAIT_FORM_MODEL_TIMEOUT_S", left),
             (pc, "DEFAULT_INFERENCE_TIMEOUT_S", left),
             (pm, "get_config_from_handshake_server", get_config_from_handshake_server)]
    saved = [(mod, name, getattr(mod, name), value) for mod, name, value in saved]
    saved_stub = _STUB_TIMEOUT_S
    for mod, name, _, value in saved:
        setattr(mod, name, value)
    _STUB_TIMEOUT_S = float(timeout)
    try:
        with warnings.catch_warnings():  # "network timeout is smaller than timeout_s": PyTriton's clients, not ours
            warnings.simplefilter("ignore", NotSupportedTimeoutWarning)
            yield
    finally:
        for mod, name, original, _ in saved:
            setattr(mod, name, original)
        _STUB_TIMEOUT_S = saved_stub


def _size(path: Optional[str]) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0


def _server_pid(triton) -> Optional[int]:
    cmd = getattr(getattr(triton, "_triton_server", None), "_tritonserver_running_cmd", None)
    return getattr(cmd, "pid", None) if cmd is not None else None


def _shm_prefix(triton) -> Optional[str]:
    """The Python backend's shared-memory prefix, unique to this Triton (its stubs carry it on their command line)."""
    try:
        return triton._python_backend_config["shm-region-prefix-name"] or None
    except (AttributeError, KeyError, TypeError):
        return None


def _abort_launch(triton, timed_out: threading.Event) -> None:
    """The start deadline passed: stop tritonserver (SIGINT, then SIGKILL) so the blocked load request returns."""
    timed_out.set()
    pid = _server_pid(triton)
    LOG.warning("the model did not start in time; stopping Triton (pid %s)", pid)
    if pid is None:
        return
    for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while time.monotonic() < end and triton._triton_server.is_alive():
            time.sleep(0.1)
        if not triton._triton_server.is_alive():
            return


def _shutdown(triton) -> None:
    """``triton.stop()``, then reap what it leaves: stubs (an unload past the exit timeout orphans them), their
    tensor-store processes, and the backend's shared memory."""
    marker = _shm_prefix(triton)
    procs = _triton_processes(_server_pid(triton), marker)
    try:
        if getattr(triton, "_triton_server", None) is not None:
            triton.stop()
    except Exception as e:  # noqa: BLE001 - a failing stop must not keep processes alive
        LOG.warning("stopping Triton: %s", _one_line(str(e)))
    finally:
        _reap(procs | _triton_processes(None, marker), marker)


def _proc_table() -> dict:
    """pid -> (ppid, start time, state, command line) of every process (Linux /proc)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        table[int(entry)] = (int(rest[1]), int(rest[19]), rest[0], cmd)
    return table


def _triton_processes(root: Optional[int], marker: Optional[str]) -> set:
    """(pid, start time) of tritonserver ``root``, the processes whose command line carries ``marker``
    (its stubs, also once orphaned) and all their descendants."""
    table = _proc_table()
    found = {pid for pid, (_, _, _, cmd) in table.items() if marker and marker in cmd}
    if root in table:
        found.add(root)
    children = collections.defaultdict(list)
    for pid, (ppid, *_) in table.items():
        children[ppid].append(pid)
    stack = list(found)
    while stack:
        for child in children[stack.pop()]:
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return {(pid, table[pid][1]) for pid in found}


def _alive(proc: tuple) -> bool:
    pid, start = proc
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return rest[0] not in ("Z", "X") and int(rest[19]) == start  # same process, not a reused pid


def _reap(procs: set, marker: Optional[str]) -> None:
    alive = [p for p in procs if _alive(p)]
    if alive:
        LOG.warning("Triton left %d process(es) behind (pids %s); stopping them", len(alive),
                    " ".join(str(p) for p, _ in sorted(alive)))
    for sig in (signal.SIGTERM, signal.SIGKILL):  # a stub hung in finalize ignores SIGTERM
        for pid, _ in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 3.0
        while alive and time.monotonic() < end:
            time.sleep(0.05)
            alive = [p for p in alive if _alive(p)]
        if not alive:
            break
    if marker:
        for f in Path("/dev/shm").glob(f"{marker}*"):
            try:
                f.unlink()
            except OSError:
                pass


_RECORD = re.compile(r"^([EWI])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+\s+[\w.-]+:\d+\]\s?(.*)$")
_PY_EXCEPTION = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Timeout|Exit|Interrupt)): \S.*$")
_BENIGN = ("CudaDriverHelper has not been initialized", "Failed to set config modification time",
           "Unable to allocate pinned system memory", "failed to stop server")


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unquote(message: str) -> str:
    message = message.strip()
    if len(message) >= 2 and message[0] == message[-1] == '"':  # Triton quotes records, newlines escaped
        try:
            return json.loads(message)
        except ValueError:
            return message[1:-1].replace("\\n", "\n").replace('\\"', '"')
    return message


def _triton_cause(log: str, last_resort: bool = False) -> Optional[str]:
    """The line of Triton's log that says why it failed, or None.

    The first error record that is not one of the usual harmless ones; when it carries a Python
    traceback (a stub's initialize), the innermost exception, e.g. "Failed to create instance:
    TimeoutError: Timeout occurred while waiting for config file .../tiny-config.sock". Else
    tritonserver's own "error: ..." or "Signal (11) received." line. With ``last_resort``, the last
    record, which says how far start-up got (for a start that ran out of time).
    """
    records, other = [], []
    for line in log.splitlines():
        m = _RECORD.match(line)
        if m:
            records.append((m.group(1), _unquote(m.group(2))))
        elif line.strip():
            other.append(line.strip())
    for level, msg in records:
        if level != "E" or any(b in msg for b in _BENIGN):
            continue
        head = msg.split("\n")[0]
        for cut in ("TritonModelException", "Traceback"):
            head = head.split(cut)[0]
        head = head.strip().rstrip(":").strip()
        head = head[len("ERROR:"):].strip() if head.startswith("ERROR:") else head
        exc = next((ln.strip() for ln in msg.split("\n") if _PY_EXCEPTION.match(ln.strip())
                    and not ln.strip().startswith("TritonModelException")), None)
        return _one_line(f"{head}: {exc}" if head and exc else exc or head or msg)
    for line in other:  # not SIGINT/SIGTERM: those are a stop's
        if line.startswith("error:") or re.match(r"Signal \((?!2\)|15\))\d+\) received", line):
            return _one_line(line)
    if last_resort:
        for _, msg in reversed(records):
            first = msg.split("\n")[0].strip()
            if first and not any(b in first for b in _BENIGN):
                return _one_line(first)
    return None


def _server_library_path() -> None:
    """Put this interpreter's libpython first for the Python-backend stub (the server inherits os.environ)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and (not parts or parts[0] != libdir):
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *[p for p in parts if p != libdir]])


# The stub-side proxy code PyTriton 0.7.0 ships, and the DLPack crossings used instead
# (a torch capsule for outputs: the stub rejects numpy's own capsule). torch is imported with the
# model, i.e. within the start-up timeout: imported lazily, each instance's first request waited for it.
_STUB_FIXES = {
    "request[input_name] = input_tensor.as_numpy()": "request[input_name] = np.from_dlpack(input_tensor).copy()",
    "pb_utils.Tensor(name, value)\n": "_tensor_from_numpy(name, value)\n",
    "import typing\n": (
        "import typing\n\nimport numpy as np\n"
        "import torch  # edgetok: with the model, not on each instance's first response (40 s on a busy CPU)\n\n\n"
        "def _tensor_from_numpy(name, value):  # edgetok: DLPack crossing (see edgetok/serve/server.py)\n"
        "    t = torch.from_numpy(np.ascontiguousarray(value))\n"
        "    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(t))\n"
    ),
}


# Instance 1's side of the config handshake with instance 0, retried until the start-up timeout: the socket
# file exists from instance 0's bind() on, but connecting is refused until its listen(), a window a busy
# CPU widens; and instance 0's side hangs up on a request slower than its wait (ValueError: empty reply).
# The config is fixed, so asking again is safe.
_STUB_HANDSHAKE = (
    "def _edgetok_handshake(socket_path, timeout_s):  # edgetok: see _STUB_HANDSHAKE in edgetok/serve/server.py\n"
    "    import time\n\n"
    "    deadline = time.time() + timeout_s\n"
    "    while True:\n"
    "        try:\n"
    "            return get_config_from_handshake_server(socket_path, timeout_s=max(0.0, deadline - time.time()))\n"
    "        except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError, ValueError):\n"
    "            if time.time() >= deadline:\n"
    "                raise\n"
    "            time.sleep(0.05)\n\n\n"
)
_HANDSHAKE_RETRY = (ConnectionRefusedError, ConnectionResetError, FileNotFoundError, ValueError)


def _stub_fixes() -> dict:
    """file -> {PyTriton 0.7.0's code: edgetok's}: the tensor crossings, and the stub-side start-up waits
    (1 s in PyTriton: instance 1's handshake with instance 0 and instance 0's wait for its request, the
    request server's start) raised to the start-up timeout of the launch under way, the handshake retried."""
    t = f"{_STUB_TIMEOUT_S:.1f}"
    model = dict(_STUB_FIXES)
    model["import typing\n"] += "\n\n" + _STUB_HANDSHAKE
    model["get_config_from_handshake_server(handshake_socket)"] = f"_edgetok_handshake(handshake_socket, {t})"
    read = 'reader.readuntil(b"\\n"), timeout='  # instance 0's wait for the handshake request
    return {
        "model.py": model,
        "communication.py": {
            "_STARTUP_TIMEOUT_S = 1.0\n": f"_STARTUP_TIMEOUT_S = {t}  # edgetok: start-up timeout\n",
            f"{read}1.0)": f"{read}{t})  # edgetok: start-up timeout",
        },
    }


def _stub_tensor_fix() -> None:
    from pytriton.models import model as pm

    if getattr(pm.Model, "_edgetok_tensor_fix", False):
        return
    original = pm.Model.get_proxy_model_files

    def get_proxy_model_files(self):
        files = original(self)
        for name, fixes in _stub_fixes().items():
            key = f"file:{self.model_version}/{name}"
            src = files[key].decode()
            for old, new in fixes.items():
                if old not in src:
                    raise ServeError("this PyTriton's stub code differs from 0.7.0; install nvidia-pytriton==0.7.0")
                src = src.replace(old, new, 1)
            files[key] = src.encode()
        return files

    pm.Model.get_proxy_model_files = get_proxy_model_files
    pm.Model._edgetok_tensor_fix = True
