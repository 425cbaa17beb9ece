"""`edgetok serve DIR --backend openvino` (issue 22): a real Triton server (PyTriton) whose model
instances run the export in OpenVINO (edgetok/runtime/openvino.py) answers over HTTP what the
OpenVINO Session answers, and reports the backend it loaded. Helpers from tests/test_serve.py."""
import signal

import numpy as np
import pytest
import torch

from edgetok.runtime.openvino import INSTALL, openvino_missing

pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install 'edgetok[serve]')")
http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(openvino_missing() is not None, reason=INSTALL)]


def test_serve_openvino_answers_like_the_session(tmp_path):
    import edgetok
    import edgetok.runtime as rt
    from conftest import tiny_vit
    from edgetok.export import export_model
    from test_serve import MODEL, _infer, free_port_block, start_server, wait_ready

    torch.manual_seed(0)
    export_model(edgetok.apply(tiny_vit(depth=2), "tome", r=2), tmp_path / "m", model_name=MODEL, check_parity=False)
    port = free_port_block()
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = start_server(tmp_path / "m", port, "--backend", "openvino", "--max-batch", "4",
                            "--log-file", str(tmp_path / "triton.log"), log=f)
        try:
            wait_ready(proc, f"127.0.0.1:{port}")
            x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
            want = rt.load(tmp_path / "m", backend="openvino", preprocess=False).run_prepared(x)["output"]
            assert np.abs(_infer(http, f"127.0.0.1:{port}", x) - want).max() < 1e-5
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=40) == 0, log.read_text()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "1 x openvino, input pixel_values" in log.read_text()
