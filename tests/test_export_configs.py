"""Every shipped export config keeps what it promises: `edgetok export --config NAME` writes
the target, the opset and the plugin/body split the config names, and `edgetok build`
accepts it; a config that cannot deploy a data-dependent token count refuses dymu with a
one-line error and leaves nothing behind. Where TensorRT-RTX is installed, every graph
that needs no plugin library is built into an engine (TensorRT-RTX's parser is TensorRT
10's: for the TensorRT 8.5 config that is evidence, not proof; docs/deploy.md)."""
from __future__ import annotations

import importlib.util
import json

import onnx
import pytest

from edgetok.cli import main
from edgetok.config import list_configs, load_config

pytestmark = pytest.mark.slow
CONFIGS = sorted(list_configs())
TINY = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
        "--model-arg", "depth=2", "--model-arg", "num_classes=5"]
HAVE_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None


def test_every_config_is_exercised():
    assert {"cpu-ort", "cuda-ort", "rtx", "jetson-xavier", "jetson-orin-nano", "h100"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_export_keeps_its_promises(name, tmp_path, capsys):
    cfg = load_config(name)
    out = tmp_path / "tome"
    assert main(["export", *TINY, "--method", "tome", "--r", "2", "--config", name, "-o", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    graph = onnx.load(str(out / "model.onnx"))
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert (m["target"], m["opset"], opset, m["config"]) == (cfg.target, cfg.opset, cfg.opset, name)
    nodes = {n.op_type for n in graph.graph.node if n.domain == "edgetok"}
    bodies = {f.name for f in graph.functions if f.domain == "edgetok"}
    if cfg.target == "trt":  # the plugin is what TensorRT <= 10.6 must use: no body to fall back on
        assert nodes == {"TokenMerge"} and not bodies and m["plugin_ops"] == ["TokenMerge"]
    elif cfg.target == "inlined":
        assert not nodes and not bodies and m["plugin_ops"] == []
    else:
        assert nodes == bodies == {"TokenMerge"}
        assert m["plugin_ops"] == (["TokenMerge"] if cfg.target == "trt-override" else [])
    if cfg.runtime == "onnxruntime" or cfg.target != "trt":
        # an fp16 ONNX Runtime config (cuda-ort) exports fp16: torch parity is the float32 graph's, before the cast
        want = cfg.target if m["precision"]["precision"] == "fp32" else "float32 full form"
        assert m["parity"]["checked_on"] == want and max(m["parity"]["max_abs_err"].values()) <= 1e-4
        assert m["precision"]["precision"] == (cfg.precision if cfg.runtime == "onnxruntime" else "fp32")

    if cfg.runtime == "tensorrt":  # no TensorRT here: the device build bundle, with its trtexec line
        assert main(["build", str(out), "--config", name]) == 0
        meta = json.loads((out / "trt_build" / "build.json").read_text())
        assert meta["needs_plugin"] == bool(m["plugin_ops"]) and meta["config"]["name"] == name
        if HAVE_RTX:  # the graph, plugin nodes through the build-time stand-ins, parsed and built here
            check = meta["rtx_build_check"]
            assert check["ok"] and check["plugin_layers"] == (2 if m["plugin_ops"] else 0), check
    if HAVE_RTX and not m["plugin_ops"]:
        rtx = load_config("rtx").model_copy(update={"compute_capabilities": (86,),  # an fp16 export builds fp16
                                                    "precision": m["precision"]["precision"]})
        from edgetok.trt import build

        assert build(out, rtx).kind == "engine"

    if not cfg.adaptive:  # refused before anything is traced or written (adaptive configs: tests/test_export.py)
        capsys.readouterr()
        dymu = tmp_path / "dymu"
        rc = main(["export", *TINY, "--method", "dymu", "--threshold", "0.2", "--config", name, "-o", str(dymu)])
        err = capsys.readouterr().err
        assert rc != 0 and "data-dependent token count" in err and "tome, drop" in err
        assert not dymu.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tome"]
