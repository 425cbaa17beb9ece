"""edgetok serve: a real Triton server (PyTriton) on a free loopback port, queried with tritonclient.

Outputs must equal the runtime Session's within 1e-5; malformed requests get an
error and the server keeps serving; a client that disconnects mid-request does
not disturb others; a missing/corrupt model fails at start; SIGTERM stops it.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install 'edgetok[serve]')")
http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")
grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

import edgetok.runtime as rt  # noqa: E402
from edgetok.serve.client import Client, ClientError  # noqa: E402

pytestmark = pytest.mark.slow
MAX_BATCH = 4
MODEL = "tiny"


def free_port_block(n: int = 3) -> int:
    """A port p with p..p+n-1 free on loopback (http, grpc, metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no free port block on loopback")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from conftest import tiny_vit
    from edgetok.export import export_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("serve_export")
    export_model(tiny_vit(depth=2), d, model_name=MODEL, check_parity=False)
    return d


def start_server(path, port, *extra, log=None):
    cmd = [sys.executable, "-m", "edgetok.cli", "serve", str(path), "--port", str(port), *extra]
    return subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)


def wait_ready(proc, url, timeout=60):
    client = http.InferenceServerClient(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before it was ready")
        try:
            if client.is_server_ready() and client.is_model_ready(MODEL):
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise AssertionError("server not ready in time")


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    port = free_port_block()
    log_path = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with open(log_path, "w") as log:
        proc = start_server(export_dir, port, "--max-batch", str(MAX_BATCH), "--instances", "2", "--threads", "1",
                            "--log-file", str(log_path.with_suffix(".triton")), log=log)
        try:
            wait_ready(proc, f"127.0.0.1:{port}")
            yield port, proc
            # graceful shutdown on SIGTERM: exit 0, ports closed
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=40) == 0, log_path.read_text()[-2000:]
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def session(export_dir):
    return rt.load(export_dir, backend="ort-cpu", preprocess=False)


def _infer(client_mod, url, x, name="pixel_values", datatype="FP32"):
    c = client_mod.InferenceServerClient(url)
    inp = client_mod.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return c.infer(MODEL, [inp]).as_numpy("output")


def test_outputs_equal_session_http_and_grpc(server, session):
    port, _ = server
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    want = session.run_prepared(x)["output"]
    assert np.abs(_infer(http, f"127.0.0.1:{port}", x) - want).max() < 1e-5
    assert np.abs(_infer(grpc, f"127.0.0.1:{port + 1}", x) - want).max() < 1e-5
    meta = http.InferenceServerClient(f"127.0.0.1:{port}").get_model_config(MODEL)
    assert meta["max_batch_size"] == MAX_BATCH and meta["input"][0]["dims"] == [3, 32, 32]  # as `edgetok triton`


def test_concurrent_requests_each_get_their_own_answer(server, session):
    port, _ = server
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1 + i % 2, 3, 32, 32)).astype(np.float32) for i in range(24)]
    got = [None] * len(xs)

    def worker(k):
        for i in range(k, len(xs), 6):
            got[i] = _infer(http, f"127.0.0.1:{port}", xs[i])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    for x, y in zip(xs, got):
        assert y is not None and np.abs(y - session.run_prepared(x)["output"]).max() < 1e-5


def test_client_helper_preprocesses_like_session(server, export_dir):
    port, _ = server
    photos = np.random.default_rng(2).integers(0, 256, (6, 40, 48, 3), dtype=np.uint8)  # NHWC, other size
    want = rt.load(export_dir, backend="ort-cpu").run(photos)["output"]
    for protocol, p in (("http", port), ("grpc", port + 1)):
        with Client(f"127.0.0.1:{p}", MODEL, protocol=protocol, preprocess=export_dir) as c:
            assert c.ready() and c.max_batch_size == MAX_BATCH
            assert np.abs(c(photos) - want).max() < 1e-5  # 6 images > max batch 4: sent in two requests
            with pytest.raises(ClientError, match="byte size|batch"):  # the server's error, one line
                c.infer_prepared(np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(ClientError, match="unknown model|not found"):
        Client(f"127.0.0.1:{port}", "nope")


@pytest.mark.parametrize("x, dtype, match", [
    (np.zeros((2, 3, 32, 32), np.float64), "FP64", "data-type is 'FP64'"),
    (np.zeros((2, 3, 16, 16), np.float32), "FP32", "unexpected shape"),
    (np.zeros((0, 3, 32, 32), np.float32), "FP32", "byte size|batch"),
    (np.zeros((MAX_BATCH + 1, 3, 32, 32), np.float32), "FP32", "batch-size must be <= 4"),
], ids=["dtype", "shape", "empty", "oversized"])
def test_malformed_requests_get_errors_and_server_keeps_serving(server, session, x, dtype, match):
    port, _ = server
    with pytest.raises(http.InferenceServerException, match=match):
        _infer(http, f"127.0.0.1:{port}", x, datatype=dtype)
    ok = np.ones((1, 3, 32, 32), np.float32)
    assert np.abs(_infer(http, f"127.0.0.1:{port}", ok) - session.run_prepared(ok)["output"]).max() < 1e-5


def test_client_disconnecting_mid_request_does_not_disturb_others(server, session):
    port, _ = server
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    body = x.tobytes()
    header = ('{"inputs":[{"name":"pixel_values","shape":[2,3,32,32],"datatype":"FP32",'
              f'"parameters":{{"binary_data_size":{len(body)}}}}}]}}').encode()
    request = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
               f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(header) + len(body)}\r\n\r\n"
               ).encode() + header
    for cut in (len(request) + len(body) // 2, len(request) + len(body)):  # half a body, then a whole one
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall((request + body)[:cut])
            s.shutdown(socket.SHUT_RDWR)  # gone before the answer
    want = session.run_prepared(x)["output"]
    results = []
    threads = [threading.Thread(target=lambda: results.append(_infer(http, f"127.0.0.1:{port}", x))) for _ in range(4)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert len(results) == 4 and all(np.abs(r - want).max() < 1e-5 for r in results)


def test_missing_and_corrupt_model_fail_at_start(tmp_path, export_dir):
    port = free_port_block()
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "edgetok.cli", "serve", str(tmp_path / "nope"), "--port", str(port)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and "does not exist" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text((export_dir / "manifest.json").read_text())
    (bad / "model.onnx").write_bytes(b"not an onnx file")
    r = subprocess.run([sys.executable, "-m", "edgetok.cli", "serve", str(bad), "--port", str(port)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and "is not the model its manifest describes" in r.stderr, r.stderr
    with socket.socket() as s:  # nothing was left listening
        assert s.connect_ex(("127.0.0.1", port)) != 0
