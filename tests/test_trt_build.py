"""TensorRT build plans, trtexec commands, device build bundles, manifests and
errors: everything that runs without TensorRT (TensorRT-only tests skip)."""
import json
import os
import subprocess

import onnx
import onnx.helper as h
import pytest
from conftest import write_manifest
import torch

from edgetok.config import list_configs, load_config
from edgetok.runtime.artifacts import resolve
from edgetok.trt import BuildPlan, EngineMismatchError, GpuInfo, PluginLibraryError, TargetMismatchError, build
from edgetok.runtime.env import plugin_library, tensorrt_version
from edgetok.runtime.engines import check_engine, load_manifest
from edgetok.trt.plan import plugin_flag, strongly_typed

TRT_CONFIGS = [n for n in list_configs() if load_config(n).runtime == "tensorrt"]


def _export_plain(d, img=32):
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=8, depth=1,
                          num_classes=5).eval()
    d.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(m, (torch.randn(1, 3, img, img),), str(d / "model.onnx"), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False, opset_version=17)
    return d


def _export_edgetok(d, with_body: bool, target=None):
    """A tiny graph with one edgetok TokenDrop node, with or without its function body."""
    d.mkdir(parents=True, exist_ok=True)
    node = h.make_node("TokenDrop", ["x", "s"], ["y", "idx"], domain="edgetok", keep=2, protect_first=0,
                       fuse_dropped=0, plugin_namespace="edgetok", plugin_version="1")
    x = h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2, 8])
    reshape = [h.make_node("Reshape", ["images", "shp"], ["x"]), h.make_node("ReduceSum", ["x", "ax"], ["s"], keepdims=0)]
    inits = [onnx.numpy_helper.from_array(__import__("numpy").array([0, 24, 8], "int64"), "shp"),
             onnx.numpy_helper.from_array(__import__("numpy").array([2], "int64"), "ax")]
    graph = h.make_graph(reshape + [node], "g", [x], [y], inits)
    funcs = []
    if with_body:
        funcs = [h.make_function("edgetok", "TokenDrop", ["x", "s"], ["y", "idx"],
                                 [h.make_node("Identity", ["x"], ["y"]), h.make_node("Shape", ["s"], ["idx"])],
                                 [h.make_opsetid("", 17)], ["keep", "protect_first", "fuse_dropped"])]
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("edgetok", 1)], functions=funcs)
    onnx.save(model, str(d / "model.onnx"))
    if target:
        write_manifest(d, target=target, model="toy")
    return d


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _export_plain(tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("name", TRT_CONFIGS)
def test_trtexec_command_per_config(plain, name):
    cfg = load_config(name)
    plan = BuildPlan.create(resolve(plain), cfg)
    ver = cfg.tensorrt.min
    argv = plan.trtexec_command(ver, "e.plan", timing_cache="t.cache")
    b = cfg.batch
    assert argv[0] == "trtexec" and "--saveEngine=e.plan" in argv
    assert f"--minShapes=images:{b.min}x3x32x32" in argv and f"--maxShapes=images:{b.max}x3x32x32" in argv
    assert f"--optShapes=images:{b.opt}x3x32x32" in argv
    assert f"--memPoolSize=workspace:{cfg.workspace_mib}M" in argv and "--timingCacheFile=t.cache" in argv
    assert ("--fp16" in argv) == (cfg.precision == "fp16")
    assert not any(a.startswith(("--dynamicPlugins", "--plugins")) for a in argv)  # plain graph: no plugins
    assert ("--skipInference" in argv) != ("--buildOnly" in argv)
    # TensorRT 11: strongly typed, no fp16 flag; the model is cast instead
    if cfg.precision != "int8":
        strong = plan.trtexec_command("11.0", "e.plan")
        assert "--stronglyTyped" in strong and "--fp16" not in strong
        assert plan.precision_for("11.0")[0] == ("float16" if cfg.precision in ("fp16", "best") else None)


@pytest.mark.parametrize("name", TRT_CONFIGS)
def test_build_bundle_per_config(plain, name, tmp_path, monkeypatch):
    monkeypatch.setattr("edgetok.trt.builder.tensorrt_version", lambda: None)
    cfg = load_config(name)
    r = build(plain, cfg, output=tmp_path)
    assert r.kind == "script" and "TensorRT is not installed" in r.message
    bundle = r.path.parent
    assert os.access(r.path, os.X_OK) and (bundle / "model.onnx").exists()
    meta = json.loads((bundle / "build.json").read_text())
    assert meta["config"]["name"] == name and meta["profile"]["images"]["max"][0] == cfg.batch.max
    text = r.path.read_text()
    assert f'WANT_SM="{cfg.sm}"' in text and "--saveEngine=engine.plan" in text
    reaches11 = cfg.tensorrt.max is None
    assert ("strong" in meta["trtexec"]) == reaches11
    assert (bundle / "model.float16.onnx").exists() == (reaches11 and cfg.precision == "fp16")
    subprocess.run(["bash", "-n", str(r.path)], check=True)  # the script parses


def _stub_trtexec(tmp_path, version_code):
    """A stand-in trtexec that only prints a version and writes the engine file, to drive the
    script's own control flow (version/GPU checks, rebuild skipping). It proves nothing about TensorRT."""
    stub = tmp_path / "trtexec"
    stub.write_text(f"""#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version_code}]"
for a in "$@"; do case $a in --saveEngine=*) echo engine > "${{a#--saveEngine=}}";; esac; done
echo "$@" >> "$(dirname "$0")/calls"
""")
    stub.chmod(0o755)
    return stub


def test_build_script_checks_version_and_skips_rebuild(plain, tmp_path, monkeypatch):
    monkeypatch.setattr("edgetok.trt.builder.tensorrt_version", lambda: None)
    r = build(plain, "jetson-orin-nano", output=tmp_path)
    env = {**os.environ, "PATH": "/usr/bin:/bin", "EDGETOK_CACHE_DIR": str(tmp_path / "cache")}
    # TensorRT 10.15 is outside JetPack 6's 10.3..10.6: the script refuses
    bad = subprocess.run(["bash", str(r.path)], env={**env, "TRTEXEC": str(_stub_trtexec(tmp_path, 101500))},
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "newer than 10.6" in bad.stderr
    good_dir = tmp_path / "ok"
    good_dir.mkdir()
    env["TRTEXEC"] = str(_stub_trtexec(good_dir, 100300))
    first = subprocess.run(["bash", str(r.path)], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    em = json.loads((r.path.parent / "engine.json").read_text())
    assert em["tensorrt"] == "10.3.0" and isinstance(em["gpu"]["sm"], int)
    second = subprocess.run(["bash", str(r.path)], env=env, capture_output=True, text=True)
    assert "up to date" in second.stdout
    builds = [c for c in (good_dir / "calls").read_text().splitlines() if "--saveEngine" in c]
    assert len(builds) == 1 and "--fp16" in builds[0]


def test_plan_errors(plain, tmp_path):
    with pytest.raises(TargetMismatchError, match="onnxruntime, not TensorRT"):
        BuildPlan.create(resolve(plain), load_config("cpu-ort"))
    with pytest.raises(TargetMismatchError, match="no DLA cores"):
        BuildPlan.create(resolve(plain), load_config("jetson-orin-nano"), dla_core=0)
    plan = BuildPlan.create(resolve(plain), load_config("jetson-agx-orin"), dla_core=1)
    assert "--useDLACore=1" in plan.trtexec_command("10.3", "e") and "--allowGPUFallback" in plan.trtexec_command("10.3", "e")
    # a portable export (bodies kept) for JetPack 6 (TensorRT 10.3 would inline the bodies): re-export
    portable = _export_edgetok(tmp_path / "p", with_body=True, target="portable")
    with pytest.raises(TargetMismatchError, match="re-export"):
        BuildPlan.create(resolve(portable), load_config("jetson-orin-nano"))
    stripped = _export_edgetok(tmp_path / "s", with_body=False, target="trt")
    plan = BuildPlan.create(resolve(stripped), load_config("jetson-orin-nano"))
    assert plan.needs_plugin
    argv = plan.trtexec_command("10.3", "e", plugin_library="/x/lib.so")
    assert "--dynamicPlugins=/x/lib.so" in argv
    assert plugin_flag("8.5") == "--plugins" and strongly_typed("11.1") and not strongly_typed("10.15")


def test_wrong_image_size_is_an_error(tmp_path):
    d = tmp_path / "dyn"
    d.mkdir()
    x = h.make_tensor_value_info("images", onnx.TensorProto.FLOAT, ["batch", 3, "h", "w"])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3, "h", "w"])
    onnx.save(h.make_model(h.make_graph([h.make_node("Relu", ["images"], ["y"])], "g", [x], [y])), str(d / "model.onnx"))
    with pytest.raises(TargetMismatchError, match="fixed sizes besides the batch"):
        BuildPlan.create(resolve(d), load_config("h100"))


def test_missing_plugin_library(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGETOK_PLUGIN_LIBRARY", raising=False)
    with pytest.raises(PluginLibraryError, match="does not exist"):
        plugin_library(tmp_path / "libnope.so")
    monkeypatch.setenv("EDGETOK_PLUGIN_DIR", str(tmp_path))  # edgetok.ops.plugins looks in an empty build dir
    with pytest.raises(PluginLibraryError, match="not built"):
        plugin_library()
    stripped = _export_edgetok(tmp_path / "s", with_body=False, target="trt")
    monkeypatch.setattr("edgetok.trt.builder.tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr("edgetok.trt.builder.gpu_info", lambda: GpuInfo("Orin", 87))
    with pytest.raises(PluginLibraryError):  # checked before TensorRT is touched
        build(stripped, "jetson-orin-nano", output=tmp_path / "o")
    with pytest.raises(TargetMismatchError, match="sm_87 but this GPU is H100"):
        monkeypatch.setattr("edgetok.trt.builder.gpu_info", lambda: GpuInfo("H100", 90))
        build(stripped, "jetson-orin-nano", output=tmp_path / "o")


def test_build_key_changes_with_each_input(plain, tmp_path):
    plan = BuildPlan.create(resolve(plain), load_config("h100"))
    gpu = {"name": "H100", "sm": 90}
    key = plan.build_key("10.15.1", gpu, None)
    assert key == BuildPlan.create(resolve(plain), load_config("h100")).build_key("10.15.1", gpu, None)
    assert key != plan.build_key("10.16.0", gpu, None)
    assert key != plan.build_key("10.15.1", {"name": "A100", "sm": 80}, None)
    assert key != BuildPlan.create(resolve(plain), load_config("a100")).build_key("10.15.1", gpu, None)
    other = _export_plain(tmp_path / "other")
    assert key != BuildPlan.create(resolve(other), load_config("h100")).build_key("10.15.1", gpu, None)


def test_engine_for_other_gpu_or_tensorrt(tmp_path):
    engine = tmp_path / "engine.plan"
    engine.write_bytes(b"x")
    with pytest.raises(EngineMismatchError, match="rebuild"):
        load_manifest(engine)
    (tmp_path / "engine.json").write_text(json.dumps({"tensorrt": "10.3.0", "gpu": {"name": "Orin", "sm": 87}}))
    m = load_manifest(engine)
    check_engine(m, engine, GpuInfo("NVIDIA Jetson AGX Orin", 87), "10.3.0")  # same device: fine
    with pytest.raises(EngineMismatchError, match="TensorRT 10.3.0, this machine has TensorRT 10.15"):
        check_engine(m, engine, GpuInfo("Orin", 87), "10.15.1")
    with pytest.raises(EngineMismatchError, match=r"built for Orin \(sm_87\).*H100"):
        check_engine(m, engine, GpuInfo("NVIDIA H100", 90), "10.3.0")


def test_fp16_cast_runs_in_ort(plain):
    import numpy as np
    import onnxruntime as ort

    from edgetok.trt.cast import cast_model

    m = cast_model(onnx.load(str(plain / "model.onnx")))
    onnx.checker.check_model(m, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(plain / "model.onnx")).run(None, {"images": x})[0]
    out = ort.InferenceSession(m.SerializeToString()).run(None, {"images": x})[0]
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 1e-2


@pytest.mark.tensorrt
@pytest.mark.skipif(tensorrt_version() is None, reason="TensorRT is not installed on this machine")
def test_tensorrt_build_and_cache(plain, tmp_path):
    from edgetok.runtime.env import gpu_info

    gpu = gpu_info()
    cfg = next((load_config(n) for n in TRT_CONFIGS if load_config(n).sm == (gpu.sm if gpu else None)
                and load_config(n).tensorrt.contains(tensorrt_version())), None)
    if cfg is None:
        pytest.skip("no export config matches this GPU and TensorRT version")
    r = build(plain, cfg, output=tmp_path, timing_cache=tmp_path / "t.cache")
    assert r.kind == "engine" and (tmp_path / "engine.json").exists() and (tmp_path / "t.cache").exists()
    assert build(plain, cfg, output=tmp_path).kind == "cached"
