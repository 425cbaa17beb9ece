"""edgetok.export.precision: the typed fp16 graph (edgetok ops and chosen ops kept float32, checker-valid,
parity with the float32 graph within FP16_TOLERANCE), the int8 Q/DQ graph (edgetok nodes and bodies
untouched and fed float tensors, attention MatMuls float, bounded error in ONNX Runtime), the refusals,
the calibration images, trt/cast.py's cast_model on top of it, and TensorRT-RTX building both graphs.

The graph under test is made by hand (a linear layer, ToMe's TokenMerge with its real body, proportional
attention, LayerNorm, a pooled head): it has every case the transforms handle and exports in no time. One
real timm ViT + ToMe export checks the same on what `edgetok export` traces."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgetok.export.precision import (FP16_TOLERANCE, INT8_TOLERANCE, PrecisionError, apply_precision,
                                      calibration_batches, check_precision, graph_precision, quantize_int8, to_fp16)

N, C, R = 17, 16, 4  # tokens (1 protected), width, tokens merged


def _w(rng, *shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def tiny_graph(seed: int = 0) -> onnx.ModelProto:
    """x [B,17,16] -> linear -> TokenMerge(r=4, protect 1) on the linear's output (the same tensor feeds the
    metric's MatMul: the quantizer rewires it) -> proportional attention -> LayerNorm -> fc -> mean -> [B,8]."""
    from edgetok.ops.onnx import PLUGIN_ATTRS, add_functions

    rng = np.random.default_rng(seed)
    inits = {"w1": _w(rng, C, C), "b1": _w(rng, C), "wm": _w(rng, C, C), "wq": _w(rng, C, C), "wk": _w(rng, C, C),
             "wo": _w(rng, C, 8), "ln_s": np.ones(C, np.float32), "ln_b": np.zeros(C, np.float32),
             "zero": np.zeros((), np.float32), "one": np.ones((), np.float32),
             "scale": np.array(C ** -0.5, np.float32), "axes": np.array([-1], np.int64),
             "axis1": np.array([1], np.int64)}
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w1"], ["h0"]), n("Add", ["h0", "b1"], ["h"]),
        n("MatMul", ["h", "wm"], ["metric"]),
        n("Mul", ["h", "zero"], ["z"]), n("ReduceSum", ["z", "axes"], ["zs"], keepdims=1), n("Add", ["zs", "one"], ["size"]),
        n("TokenMerge", ["h", "metric", "size"], ["t", "tsize"], domain="edgetok", name="merge0", r=R, protect_first=1,
          **PLUGIN_ATTRS),
        n("MatMul", ["t", "wq"], ["q"]), n("MatMul", ["t", "wk"], ["k"]),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), n("MatMul", ["q", "kt"], ["s0"]), n("Mul", ["s0", "scale"], ["s1"]),
        n("Log", ["tsize"], ["logs"]), n("Transpose", ["logs"], ["logst"], perm=[0, 2, 1]), n("Add", ["s1", "logst"], ["s"]),
        n("Softmax", ["s"], ["a"], axis=-1), n("MatMul", ["a", "t"], ["att"]), n("Add", ["att", "t"], ["res"]),
        n("LayerNormalization", ["res", "ln_s", "ln_b"], ["ln"], axis=-1),
        n("MatMul", ["ln", "wo"], ["o"]), n("ReduceMean", ["o", "axis1"], ["output"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N, C])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = add_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds(count: int, batch: int = 4, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, N, C), dtype=np.float32)} for _ in range(count)]


def producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


@pytest.fixture(scope="module")
def fp32():
    return tiny_graph()


# -- fp16 -------------------------------------------------------------------------------------------------
def test_fp16_graph_is_typed_checker_valid_and_within_tolerance(fp32):
    out, record = apply_precision(fp32, "fp16", parity_feeds=feeds(2))
    onnx.checker.check_model(out, full_check=True)
    assert graph_precision(out) == "fp16" and record["precision"] == "fp16"
    assert {t.data_type for t in out.graph.initializer if t.name.startswith("w")} == {TensorProto.FLOAT16}
    io = [v.type.tensor_type.elem_type for v in (*out.graph.input, *out.graph.output)]
    assert io == [TensorProto.FLOAT, TensorProto.FLOAT]  # float32 I/O: runtime and manifests unchanged
    assert record["kept_fp32"] == {"edgetok::TokenMerge": 1}
    assert [p["inputs"] for p in record["parity"]] == ["random normal inputs, seed 0", "the images given"]
    for p in record["parity"]:
        assert p["passed"] and p["max_rel_err"] <= FP16_TOLERANCE["max_rel_err"]
        assert p["cosine_min"] >= FP16_TOLERANCE["cosine_min"] and p["max_abs_err"] > 0  # it did change


def test_fp16_keeps_the_edgetok_op_float32(fp32):
    out, _ = to_fp16(fp32)
    prod = producers(out)
    merge = next(n for n in out.graph.node if n.domain == "edgetok")
    for name in merge.input:  # every float input cast up to float32 just before the op
        assert prod[name].op_type == "Cast" and prod[name].attribute[0].i == TensorProto.FLOAT
    readers = {n.input[0]: n for n in out.graph.node if n.op_type == "Cast"}
    for name in merge.output:  # and cast down after it
        assert readers[name].attribute[0].i == TensorProto.FLOAT16
    # the body is the float32 graph's, byte for byte: scores, -inf masks, TopK keys, size sums in float32
    assert [f.SerializeToString() for f in out.functions] == [f.SerializeToString() for f in fp32.functions]


def test_fp16_keep_fp32_ops(fp32):
    out, record = to_fp16(fp32, keep_fp32=("Softmax", "LayerNormalization"))
    assert record["kept_fp32"] == {"LayerNormalization": 1, "Softmax": 1, "edgetok::TokenMerge": 1}
    prod = producers(out)
    softmax = next(n for n in out.graph.node if n.op_type == "Softmax")
    assert prod[softmax.input[0]].op_type == "Cast" and prod[softmax.input[0]].attribute[0].i == TensorProto.FLOAT
    onnx.checker.check_model(out, full_check=True)
    with pytest.raises(PrecisionError, match="keep_fp32"):
        to_fp16(fp32, keep_fp32=("MatMul",))


def test_cast_model_uses_the_fp16_transform(fp32):
    from edgetok.trt.cast import cast_model

    cast = cast_model(fp32, "float16")
    assert cast.graph == to_fp16(fp32)[0].graph
    assert cast_model(cast, "float16").graph == cast.graph  # an fp16 export is built as it is
    bf16 = cast_model(fp32, "bfloat16")
    assert graph_precision(bf16) == "bf16"
    assert next(n for n in bf16.graph.node if n.domain == "edgetok").input[0] in {
        n.output[0] for n in bf16.graph.node if n.op_type == "Cast"}


# -- int8 -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int8(fp32):
    return apply_precision(fp32, "int8", feeds(5), target="ort-cpu")


def test_int8_qdq_graph_keeps_edgetok_nodes_float(fp32, int8):
    out, record = int8
    onnx.checker.check_model(out, full_check=True)
    assert graph_precision(out) == "int8"
    prod = producers(out)
    merge = next(n for n in out.graph.node if n.domain == "edgetok")
    assert [prod[i].op_type for i in merge.input] == ["Add", "MatMul", "Add"]  # float tensors, no DQ
    # the quantizer had rewired the linear's output (read by a quantized MatMul and by TokenMerge) to its DQ
    assert record["edgetok_inputs_set_back_to_float"] == 1
    assert [f.SerializeToString() for f in out.functions] == [f.SerializeToString() for f in fp32.functions]
    assert record["quantized_ops"] == {"MatMul": 5} and record["float_ops"] == {"MatMul": 2}  # QK^T, AV float
    for node in out.graph.node:
        if node.op_type == "MatMul" and node.input[1].startswith("w"):
            assert prod[node.input[0]].op_type == "DequantizeLinear"
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    zero_points = [t for t in out.graph.initializer if t.name in {n.input[2] for n in dq if len(n.input) > 2}]
    assert zero_points and all(t.data_type == TensorProto.INT8 and not numpy_helper.to_array(t).any()
                               for t in zero_points)  # s8s8: symmetric, what TensorRT consumes


def test_int8_runs_in_ort_with_bounded_error(int8):
    _, record = int8
    assert record["calibration"] == {"images": 16, "batches": 4, "source": "in memory"}
    (p,) = record["parity"]
    assert p["inputs"] == "images held out of the calibration" and p["passed"]
    assert p["cosine_min"] >= INT8_TOLERANCE["cosine_min"] and 0 < p["max_rel_err"] < 0.2


def test_int8_u8s8_scheme(fp32):
    out, record = quantize_int8(fp32, feeds(2), scheme="u8s8")
    assert record["activation"] == "uint8" and record["reduce_range"]
    with pytest.raises(PrecisionError, match="already int8"):
        quantize_int8(out, feeds(2))
    with pytest.raises(PrecisionError, match="unknown int8 scheme"):
        quantize_int8(fp32, feeds(2), scheme="s4")


# -- a real export ------------------------------------------------------------------------------------------
def test_real_tiny_vit_tome_export(tmp_path):
    import torch

    import edgetok
    from conftest import tiny_vit
    from edgetok.export.exporter import export_onnx

    torch.manual_seed(0)
    proto = export_onnx(edgetok.apply(tiny_vit(depth=2), "tome", r=2), (3, 32, 32))
    rng = np.random.default_rng(0)
    images = (rng.random((24, 32, 32, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "calib.npz", images=images)
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "size": [32, 32]}
    half, rec16 = apply_precision(proto, "fp16", tmp_path / "calib.npz", preprocessing=pre)
    assert rec16["kept_fp32"] == {"edgetok::TokenMerge": 2} and all(p["passed"] for p in rec16["parity"])
    q, rec8 = apply_precision(proto, "int8", tmp_path / "calib.npz", preprocessing=pre, target="t4")
    assert rec8["calibration"]["images"] == 16 and rec8["calibration"]["source"].endswith("calib.npz")
    assert rec8["quantized_ops"] == {"Conv": 1, "MatMul": 8, "Gemm": 1} and rec8["parity"][0]["passed"]
    for m in (half, q):
        onnx.checker.check_model(m, full_check=True)
        assert sorted(n.op_type for n in m.graph.node if n.domain == "edgetok") == ["TokenMerge", "TokenMerge"]


# -- refusals -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, target, calibration, message", [
    ("int8", None, None, "needs calibration images: pass --calibration DIR"),
    ("int8", "rtx", [], "needs calibration images"),
    ("int8", "cuda-ort", ["x"], "refused for config 'cuda-ort'.*no int8 kernels"),
    ("int8", "ort-cuda", ["x"], "refused for ort-cuda"),
    ("fp16", "cpu-ort", None, "refused for config 'cpu-ort'.*float32 casts"),
    ("fp16", "ort-cpu", None, "refused for ort-cpu"),
    ("bf16", "rtx", None, "bf16 is not offered"),
    ("best", "t4", None, "TensorRT builder flag"),
    ("fp8", None, None, "unknown precision 'fp8'; choose one of fp32, fp16, int8"),
])
def test_refusals(precision, target, calibration, message):
    with pytest.raises(PrecisionError, match=message):
        check_precision(precision, target, calibration)


def test_int8_refused_where_a_gpu_has_no_float32_gemm():
    from edgetok.config import load_config

    rtx = load_config("rtx")  # builds for sm_75 too
    with pytest.raises(PrecisionError, match="no float32 GEMM for Turing"):
        check_precision("int8", rtx, ["x"])
    assert check_precision("int8", rtx.model_copy(update={"compute_capabilities": (86, 89)}), ["x"]) == "int8"


@pytest.mark.parametrize("precision, target", [("fp32", "cpu-ort"), ("fp16", "cuda-ort"), ("fp16", "rtx"),
                                               ("fp16", "jetson-orin-nano"), ("int8", "t4"),
                                               ("int8", "cpu-ort"), ("int8", "ort-cpu"), ("fp16", None)])
def test_accepted(precision, target):
    assert check_precision(precision, target, ["calibration"]) == precision


def test_refusal_of_graphs_already_converted(fp32, int8):
    from edgetok.trt.cast import cast_model

    half, _ = to_fp16(fp32)
    with pytest.raises(PrecisionError, match="already fp16"):
        to_fp16(half)
    with pytest.raises(PrecisionError, match="already int8.*precision is int8"):
        cast_model(int8[0], "float16")
    with pytest.raises(PrecisionError, match="differs from the float32 graph"):
        apply_precision(fp32, "int8", feeds(2), parity_feeds=[{"x": feeds(1)[0]["x"] * 50}])


# -- calibration images ------------------------------------------------------------------------------------------
def test_calibration_from_a_folder_and_an_npz(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate([(40, 30), (32, 32), (64, 48), (20, 50), (33, 33)]):
        folder = tmp_path / "imgs" / ("sub" if i % 2 else "")
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "size": [32, 32]}
    batches = calibration_batches(tmp_path / "imgs", pre, ["batch", 3, 32, 32], batch=2)
    assert [b.shape for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    assert all(b.dtype == np.float32 and -1.01 <= b.min() and b.max() <= 1.01 for b in batches)
    np.savez(tmp_path / "c.npz", images=(rng.random((5, 32, 32, 3)) * 255).astype(np.uint8))
    assert [b.shape[0] for b in calibration_batches(tmp_path / "c.npz", pre, [1, 3, 32, 32], batch=4)] == [4, 1]
    ready = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)  # float: already preprocessed, kept as is
    assert np.array_equal(calibration_batches(ready, None, [1, 3, 32, 32])[0], ready)
    assert len(calibration_batches(tmp_path / "imgs", pre, [1, 3, 32, 32], batch=1, limit=3)) == 3


def test_calibration_errors(tmp_path):
    shape = [1, 3, 32, 32]
    with pytest.raises(PrecisionError, match="does not exist"):
        calibration_batches(tmp_path / "missing", None, shape)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrecisionError, match="holds no images"):
        calibration_batches(tmp_path / "empty", None, shape)
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(PrecisionError, match=r"taken as preprocessed and must be \[N,3,32,32\]"):
        calibration_batches(tmp_path / "f.npz", None, shape)
    np.savez(tmp_path / "none.npz", labels=np.zeros(3))
    with pytest.raises(PrecisionError, match="no image array"):
        calibration_batches(tmp_path / "none.npz", None, shape)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(PrecisionError, match="cannot read calibration image"):
        calibration_batches(tmp_path / "bad", None, shape)
    with pytest.raises(PrecisionError, match="image input"):
        calibration_batches(tmp_path / "f.npz", None, [1, 17, 16])


# -- TensorRT-RTX ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                    reason="TensorRT-RTX is not installed: pip install 'edgetok[rtx]'")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_rtx_builds(precision, fp32, int8, tmp_path):
    """TensorRT-RTX (strongly typed) parses and builds the fp16 graph and the Q/DQ graph (explicit int8)."""
    from edgetok.config import load_config
    from edgetok.trt import build

    graph = to_fp16(fp32)[0] if precision == "fp16" else int8[0]
    onnx.save(graph, str(tmp_path / "model.onnx"))
    # fp16: the config's precision makes the builder call cast_model, which keeps an fp16 graph as it is;
    # int8: the Q/DQ nodes carry the precision, so the graph is built as written. Ampere: the float32
    # islands (edgetok ops, attention's MatMuls in the int8 graph) have no Turing kernel in TensorRT-RTX
    config = load_config("rtx").model_copy(update={"precision": precision, "compute_capabilities": (86,)})
    result = build(tmp_path / "model.onnx", config, force=True)
    layers = result.manifest["build"]["layers_by_type"]
    assert result.kind == "engine" and result.path.stat().st_size > 0
    if precision == "int8":
        assert layers["QUANTIZE"] >= 1 and layers["DEQUANTIZE"] >= 1  # the builder fuses some of the Q/DQ pairs
    else:
        assert "QUANTIZE" not in layers and layers["CAST"] >= 5


# -- the export command and the build ----------------------------------------------------------------------------
@pytest.mark.parametrize("precision, config, want, note", [
    (None, None, "fp32", None), ("fp16", None, "fp16", None), (None, "cuda-ort", "fp16", None),
    (None, "cpu-ort", "fp32", None), (None, "rtx", "fp32", "casts it to fp16"), ("fp16", "rtx", "fp16", None),
    ("fp32", "h100", "fp32", "casts it to fp16"),
])
def test_export_precision_follows_the_config(precision, config, want, note):
    from edgetok.config import load_config
    from edgetok.export.precision import export_precision

    got, why = export_precision(precision, load_config(config) if config else None)
    assert got == want and (note in why if note else why is None)


@pytest.mark.parametrize("precision, config, message", [
    ("int8", "h100", "disagrees with config 'h100', whose precision is fp16"),
    ("fp16", "cpu-ort", "refused for config 'cpu-ort'"),  # the runtime's refusal, not the disagreement
    ("fp32", "cuda-ort", "disagrees with config 'cuda-ort'"),
])
def test_export_precision_disagreements(precision, config, message):
    from edgetok.config import load_config
    from edgetok.export.precision import export_precision

    with pytest.raises(PrecisionError, match=message):
        export_precision(precision, load_config(config), ["x"])


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    """`edgetok export --precision int8 --calibration` of a tiny ToMe ViT, through the CLI."""
    from edgetok.cli import main

    d = tmp_path_factory.mktemp("int8")
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", images=(rng.random((40, 32, 32, 3)) * 255).astype(np.uint8))
    rc = main(["export", "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg",
               "patch_size=8", "--model-arg", "depth=2", "--method", "tome", "--r", "2", "--precision", "int8",
               "--calibration", str(d / "calib.npz"), "-o", str(d / "q")])
    assert rc == 0
    return d


def test_int8_export_records_its_precision_and_runs(int8_export):
    from edgetok.runtime.manifest import Manifest
    from edgetok.runtime.session import load

    m = Manifest.read(int8_export / "q")
    rec = m.precision
    assert rec["precision"] == "int8" and rec["calibration"]["images"] + rec["parity"][0]["samples"] == 40
    assert rec["parity"][0]["passed"] and m.parity["checked_on"] == "float32 full form"
    assert m.parity["max_abs_err"]["1"] <= 1e-4  # the float32 graph against torch, before quantization
    assert graph_precision(int8_export / "q" / "model.onnx") == "int8"
    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    out = load(int8_export / "q", backend="ort-cpu").run_prepared(x)
    assert np.isfinite(out[next(iter(out))]).all()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                    reason="TensorRT-RTX is not installed: pip install 'edgetok[rtx]'")
def test_build_takes_the_int8_export_and_refuses_mismatches(int8_export, tmp_path):
    from edgetok.cli import main

    cfg = tmp_path / "rtx-int8.yaml"
    cfg.write_text((Path(__file__).parents[1] / "export_configs" / "rtx.yaml").read_text()
                   .replace("precision: fp16", "precision: int8")
                   .replace("compute_capabilities: [75, 80, 86, 89, 120]", "compute_capabilities: [86]"))
    assert main(["build", str(int8_export / "q"), "--config", "rtx", "--output", str(tmp_path / "e1")]) == 1
    assert not (tmp_path / "e1" / "engine.rtx.plan").exists()
    assert main(["build", str(int8_export / "q"), "--config", str(cfg), "--output", str(tmp_path / "e2")]) == 0
    report = json.loads((tmp_path / "e2" / "engine.rtx.json").read_text())
    assert report["build"]["layers_by_type"]["QUANTIZE"] > 0 and "Q/DQ" in " ".join(report["notes"])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                    reason="TensorRT-RTX is not installed: pip install 'edgetok[rtx]'")
def test_turing_builds_the_reduction_in_fp16(fp32, tmp_path):
    """TensorRT-RTX has no float32 GEMM for sm_75: for a config that includes it the edgetok ops are cast
    to float16 too, and the real builder then builds the graph for every listed GPU."""
    from edgetok.config import load_config
    from edgetok.export.precision import fp32_gemm
    from edgetok.trt import build

    rtx = load_config("rtx")
    assert not fp32_gemm(rtx) and fp32_gemm(rtx.model_copy(update={"compute_capabilities": (86,)}))
    assert fp32_gemm(load_config("h100"))
    assert to_fp16(fp32)[1]["kept_fp32"] == {"edgetok::TokenMerge": 1}
    rec = to_fp16(fp32, reduction_fp32=False)[1]
    assert rec["kept_fp32"] == {} and rec["reduction_ops"] == "float16"
    onnx.save(fp32, str(tmp_path / "model.onnx"))
    result = build(tmp_path / "model.onnx", rtx, force=True)
    assert result.kind == "engine" and result.manifest["compute_capabilities"][0] == 75
