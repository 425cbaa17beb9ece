"""OpenVINO as a backend (edgetok/runtime/openvino.py, issue 22): every registered method that
exports, exported from a tiny random timm ViT, runs in OpenVINO itself and matches the torch
model (and ONNX Runtime on every output) to <= 1e-4 at batch 1 and 3; the precision is float32
unless bfloat16 is asked for by name; the streaming DTD step takes its state input; a graph
without bodies (a `trt` export) is refused with the fix; `edgetok validate --backend openvino` and
`edgetok bench --backend openvino` run, and the tuner measures in OpenVINO; the openvino-cpu
config writes a graph OpenVINO reads;
without openvino the backend says how to install it (and these tests skip with that reason)."""
from __future__ import annotations

import functools
import json
import sys

import numpy as np
import pytest
import torch

import edgetok
import edgetok.runtime as rt
from conftest import VIT_METHODS, tiny_vit, vit_method_model
from edgetok.cli import main
from edgetok.runtime.openvino import INSTALL, openvino_missing

pytestmark = pytest.mark.slow  # exports: run by default, deselect with -m "not slow"
needs_openvino = pytest.mark.skipif(openvino_missing() is not None, reason=INSTALL)
ATOL = 1e-4



@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino")

    @functools.lru_cache(maxsize=None)
    def export(method: str):
        from edgetok.export.exporter import export_model

        model = vit_method_model(method)
        # the ONNX Runtime check is this test's own (every output, below)
        out = export_model(model, root / method, model_name="tiny-vit",
                           input_shape=(3, 32, 32), check_parity=False).output_dir
        return model.eval(), out

    return export


def _torch(model, x) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return [t.numpy() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _close(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    if np.issubdtype(ref.dtype, np.integer) or ref.dtype == bool:
        assert np.array_equal(got.astype(np.int64), ref.astype(np.int64)), what
    else:
        assert np.abs(got - ref).max(initial=0) <= ATOL, (what, float(np.abs(got - ref).max()))


def test_every_vit_method_is_listed():
    """A newly registered ViT method must be added here, so its export is run in OpenVINO."""
    from edgetok.reduce.registry import get_method

    blocks = {name for name in edgetok.methods() if get_method(name).kind == "blocks"}
    assert blocks <= set(VIT_METHODS), f"add {sorted(blocks - set(VIT_METHODS))} to VIT_METHODS"


@needs_openvino
@pytest.mark.parametrize("method", sorted(VIT_METHODS))
def test_openvino_matches_torch(exports, method):
    model, out = exports(method)
    ov = rt.load(out, backend="openvino", preprocess=False)
    ort = rt.load(out, backend="ort-cpu", preprocess=False)
    assert ov.backend == "openvino" and ov.runner.precision == "fp32"
    assert ov.runner.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    assert ov.output_names == ort.output_names
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got, ref = ov.run(x), ort.run(x)
        for name in ref:
            _close(got[name], ref[name], f"{method} bs{batch} {name} vs ONNX Runtime")
        for name, t in zip(ov.output_names, _torch(model, x)):
            _close(got[name], t, f"{method} bs{batch} {name} vs torch")


@needs_openvino
def test_inlined_graph_and_bf16_on_request(exports):
    """The inlined form (the openvino-cpu config's target) matches torch too; bfloat16 only by name."""
    import onnx

    from edgetok.export import apply_target
    from edgetok.runtime.openvino import compile_openvino

    model, out = exports("tome")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = _torch(model, x)[0]
    inlined = compile_openvino(apply_target(onnx.load(str(out / "model.onnx")), "inlined"))
    _close(inlined.create_infer_request().infer({"pixel_values": x})[inlined.output("output")], ref, "inlined")
    reason = rt.get_backend("openvino-bf16").unavailable()
    if reason is not None:
        assert "bfloat16" in reason
        return
    sess = rt.load(out, backend="openvino-bf16", preprocess=False)
    assert sess.backend == "openvino-bf16" and sess.runner.precision == "bf16"
    assert sess.runner.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
    err = float(np.abs(sess.run(x)["output"] - ref).max())
    assert 0 < err < 0.1  # bfloat16: close, but not float32 (which is what the default guarantees)


@needs_openvino
def test_graph_without_bodies_is_refused_with_the_fix(exports):
    import onnx

    from edgetok.export import apply_target
    from edgetok.runtime.artifacts import resolve
    from edgetok.runtime.openvino import compile_openvino

    _, out = exports("tome")
    art = resolve(out)
    art.manifest = art.manifest.model_copy(update={"target": "trt", "plugin_ops": ["TokenMerge"],
                                                   "function_bodies": []})
    reason = rt.get_backend("openvino").unavailable(art)
    assert "no standard-op body" in reason and "--target portable" in reason
    stripped = apply_target(onnx.load(str(out / "model.onnx")), "trt")  # what a trt export holds
    with pytest.raises(rt.BackendError, match="No conversion rule found for operations: edgetok.TokenMerge"):
        compile_openvino(stripped)


@needs_openvino
def test_dtd_step_takes_its_state(tmp_path):
    from edgetok.export.dtd import OUTPUTS, export_dtd_step, frames

    torch.manual_seed(0)
    res = export_dtd_step(tiny_vit(depth=2), tmp_path / "dtd", threshold=0.05, check_parity=False)
    ov = rt.load(res.output_dir, backend="openvino", preprocess=False)
    ort = rt.load(res.output_dir, backend="ort-cpu", preprocess=False)
    prev_ov = prev_ort = np.zeros((2, 17, 32), np.float32)
    for t, x in enumerate(frames((3, 32, 32), batch=2)):
        got = ov.runner.infer(x.numpy(), prev_tokens=prev_ov)
        ref = ort.runner.infer(x.numpy(), prev_tokens=prev_ort)
        for name in OUTPUTS:
            _close(got[name], ref[name], f"frame {t} {name}")
        prev_ov, prev_ort = got["tokens"], ref["tokens"]
    with pytest.raises(edgetok.errors.InputShapeError, match="prev_tokens"):
        ov.runner.infer(x.numpy())


@needs_openvino
def test_validate_cli(exports, capsys, tmp_path):
    _, out = exports("tome")
    _, base = exports("none")
    report = tmp_path / "r.json"
    assert main(["validate", str(out), "--backend", "openvino", "--baseline", str(base), "--runs", "3",
                 "--warmup", "1", "--report", str(report)]) == 0
    assert capsys.readouterr().out.startswith("openvino batch 1: p50 ")
    r = json.loads(report.read_text())
    assert r["model"]["backend"] == r["baseline"]["backend"] == "openvino" and r["model"]["latency"]["p50_ms"] > 0


@needs_openvino
def test_bench_cli(monkeypatch, tmp_path):
    from edgetok.commands import bench

    torch.manual_seed(0)
    monkeypatch.setattr(bench, "load_models", lambda names: {n: (tiny_vit(depth=1), "random") for n in names})
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "tiny", "--backend", "openvino", "--batches", "2", "--repeats", "1",
                 "--variant", "tome:r=4", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["variant"]) for r in rows} == {("openvino", "baseline"), ("openvino", "tome:r=4")}
    assert all(r["p50_ms"] > 0 for r in rows)
    assert main(["bench", "--models", "tiny", "--backend", "openvno", "--batches", "1", "--repeats", "1",
                 "--json-out", str(out)]) != 0


def test_openvino_cpu_config():
    """The config's CLI export is run (and checked in ONNX Runtime) by tests/test_export_configs.py;
    its graph in OpenVINO by test_inlined_graph_and_bf16_on_request."""
    from edgetok.config import ConfigError, load_config, parse_config

    cfg = load_config("openvino-cpu")
    assert (cfg.runtime, cfg.device, cfg.target, cfg.precision) == ("openvino", "cpu", "inlined", "fp32")
    data = cfg.model_dump(exclude={"name", "path"}) | {"target": "trt"}
    with pytest.raises(ConfigError, match="runtime openvino runs standard ops on the CPU"):
        parse_config(data, "bad")


def test_missing_openvino_says_how_to_install(monkeypatch, exports):
    _, out = exports("tome")
    monkeypatch.setitem(sys.modules, "openvino", None)  # find_spec answers None, as when not installed
    assert openvino_missing() == INSTALL == "openvino is not installed: pip install 'edgetok[openvino]'"
    with pytest.raises(rt.BackendError, match=r"pip install 'edgetok\[openvino\]'"):
        rt.load(out, backend="openvino")


@needs_openvino
def test_tuner_measures_in_openvino():
    """--schedule auto --target openvino-cpu measures its cost table in OpenVINO (edgetok/tune/auto.py)."""
    from edgetok.config import load_config
    from edgetok.tune.auto import _timer, backend_for_config

    assert backend_for_config(load_config("openvino-cpu")) == "openvino"
    mods = {"linear": torch.nn.Linear(32, 32),
            "mlp": torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))}
    times = _timer("openvino")(mods, torch.randn(2, 17, 32), 2)
    assert set(times) == {"linear", "mlp"} and all(v > 0 for v in times.values())
