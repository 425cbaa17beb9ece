"""What users bring: real checkpoints (Hugging Face save_pretrained folders, their own
state dicts), a parity check that can fail, manifests that protect the model, outputs
that lose nothing, and every bad input a one-line error with nothing left behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetok.cli import main

pytestmark = pytest.mark.slow
TINY = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
        "--model-arg", "depth=2", "--model-arg", "num_classes=5"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    for name, args in (("tome", ["--method", "tome", "--r", "2"]), ("base", ["--method", "none"]),
                       ("trt", ["--method", "tome", "--r", "2", "--target", "trt"])):
        assert main(["export", *TINY, *args, "-o", str(root / name)]) == 0
    return root


def fails_in_one_line(capsys, argv, *words, code=None) -> str:
    """The CLI exits non-zero with one error line naming the problem, and no traceback."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and (code is None or rc == code), (rc, err)
    lines = [l for l in err.splitlines() if l.lower().startswith("error")]
    assert "Traceback" not in err and len(lines) == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


# -- bad input, one line each -----------------------------------------------------------------
def test_bad_inputs_table(exports, tmp_path, capsys):
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes((exports / "tome" / "model.onnx").read_bytes()[:1000])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    bad_video = tmp_path / "clip.mp4"
    bad_video.write_bytes(b"not a video at all")
    empty_video = tmp_path / "empty.mp4"
    empty_video.write_bytes(b"")
    table = [
        (["build", str(trunc), "--config", "rtx"], ["not a readable ONNX model"]),
        (["validate", str(exports / "tome"), "--runs", "0"], ["--runs"]),
        (["validate", str(exports / "tome"), "--batch", "-2"], ["--batch"]),
        (["validate", str(exports / "tome"), "--batch", "0"], ["--batch"]),
        (["validate", str(exports / "tome"), "--report", str(tmp_path)], ["--report"]),
        (["export", *TINY, "--method", "drop", "--keep-rate", "0.5", "--layers", "a,b", "-o", str(tmp_path / "x")],
         ["--layers", "comma list"]),
        (["export", *TINY, "--weights", str(corrupt), "-o", str(tmp_path / "x")], ["corrupt.safetensors", "readable"]),
        (["stream", str(bad_video), "--model", "vit_tiny_patch16_224", "--depth", "1", "--no-plot"],
         ["not a readable video"]),
        (["stream", str(empty_video), "--model", "vit_tiny_patch16_224", "--depth", "1", "--no-plot"],
         ["empty.mp4"]),
        (["bench", "--batches", "0"], ["batch sizes must be >= 1"]),
        (["export", *TINY, "--precision", "int8", "-o", str(tmp_path / "x")], ["--calibration DIR"]),
        (["export", *TINY, "--precision", "fp16", "--config", "cpu-ort", "-o", str(tmp_path / "x")],
         ["refused for config 'cpu-ort'"]),
        (["export", *TINY, "--precision", "int8", "--calibration", str(corrupt), "--config", "h100", "-o",
          str(tmp_path / "x")], ["disagrees with config 'h100'"]),
        (["validate", str(exports / "trt"), "--backend", "ort-cpu"], ["no standard-op body", "--target portable"]),
        (["export", *TINY, "--model", "no_such_model", "-o", str(tmp_path / "x")], ["unknown model"]),
    ]
    for argv, words in table:
        fails_in_one_line(capsys, argv, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "corrupt.safetensors", "empty.mp4", "trunc.onnx"]


def test_methods_command_lists_every_method(capsys):
    import edgetok

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in edgetok.methods()) and "parameters:" in out


def test_images_the_runtime_refuses(exports):
    import edgetok.runtime as rt
    from edgetok.errors import InputShapeError

    sess = rt.load(exports / "tome", backend="ort-cpu")
    photo = np.random.default_rng(0).integers(0, 256, (40, 48, 3)).astype(np.uint8)
    assert sess(photo).shape == (1, 5) and sess([photo, photo[:30]]).shape == (2, 5)  # sizes differ: fine
    assert np.array_equal(sess(photo.astype(np.int64)), sess(photo))  # 8-bit values in int64
    for bad in (photo.astype(np.float32), photo.astype(np.int64) * 300):  # 0..255 floats, 16-bit values
        with pytest.raises(InputShapeError):
            sess(bad)


# -- manifests that protect the user ------------------------------------------------------------
def test_manifest_protects_the_model(exports, tmp_path, capsys):
    swapped = tmp_path / "swapped"
    shutil.copytree(exports / "tome", swapped)
    shutil.copy(exports / "base" / "model.onnx", swapped / "model.onnx")
    fails_in_one_line(capsys, ["validate", str(swapped), "--runs", "2"], "not the model its manifest describes")
    stripped = tmp_path / "stripped"
    shutil.copytree(exports / "tome", stripped)
    m = json.loads((stripped / "manifest.json").read_text())
    del m["preprocessing"]
    (stripped / "manifest.json").write_text(json.dumps(m))
    fails_in_one_line(capsys, ["validate", str(stripped), "--runs", "2"], "'preprocessing' is missing")
    other = tmp_path / "other"
    assert main(["export", "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=48", "--model-arg",
                 "patch_size=8", "--model-arg", "depth=2", "--method", "none", "-o", str(other)]) == 0
    fails_in_one_line(capsys, ["validate", str(exports / "tome"), "--baseline", str(other), "--runs", "2"],
                      "same input size")
    reseeded = tmp_path / "reseeded"
    assert main(["export", *TINY, "--method", "none", "--seed", "1", "-o", str(reseeded)]) == 0
    fails_in_one_line(capsys, ["validate", str(exports / "tome"), "--baseline", str(reseeded), "--runs", "2"],
                      "two different networks")
    assert main(["validate", str(exports / "tome"), "--baseline", str(exports / "base"), "--runs", "2",
                 "--warmup", "0"]) == 0


# -- nothing lost, nothing left -------------------------------------------------------------------
def test_reexport_keeps_the_users_files_and_umask(exports, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(exports / "tome", out)
    (out / "NOTES.txt").write_text("mine")
    (out / "trt_build").mkdir()
    (out / "trt_build" / "build.json").write_text("{}")
    old = os.umask(0o022)
    try:
        assert main(["export", *TINY, "--method", "drop", "--keep-rate", "0.5", "-o", str(out)]) == 0
    finally:
        os.umask(old)
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "trt_build" / "build.json").exists()
    assert json.loads((out / "manifest.json").read_text())["method"] == "drop"
    for name in ("model.onnx", "manifest.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep")
    fails_in_one_line(capsys, ["export", *TINY, "--method", "none", "-o", str(foreign)], "--force")
    assert main(["export", *TINY, "--method", "none", "--force", "-o", str(foreign)]) == 0
    assert (foreign / "data.txt").read_text() == "keep" and (foreign / "model.onnx").exists()


def test_sigterm_during_export_leaves_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    with open(tmp_path / "stderr.txt", "w") as log:  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen([sys.executable, "-m", "edgetok.cli", "export", *TINY, "-o", str(out)],
                                stderr=log, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and not any(p.name.startswith(".out.tmp-") for p in work.iterdir()):
            time.sleep(0.05)  # the staged directory exists: the export is under way
        assert proc.poll() is None, "the export ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert list(work.iterdir()) == []


# -- a parity check that can fail ---------------------------------------------------------------------
def test_parity_refuses_constant_outputs_and_checks_features(tmp_path):
    from edgetok.export.exporter import ExportError, export_model
    from edgetok.patch.models import create_model

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3) + x.sum() * 0

    with pytest.raises(ExportError, match="constant"):
        export_model(Constant(), tmp_path / "c", input_shape=(3, 8, 8))
    # torchvision zero-initialises its head: the logits are 0, the features carry the proof
    tv = create_model("tv:vit_b_16", model_args=dict(image_size=32, num_classes=5))
    res = export_model(tv, tmp_path / "tv", model_name="tv:vit_b_16")
    assert [o.name for o in res.manifest.outputs] == ["output", "features"]
    assert res.manifest.preprocessing.source.startswith("torchvision weights transforms")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tv"]


# -- real checkpoints in -------------------------------------------------------------------------------
HF_FOLDERS = {  # class, config, processor, processor arguments (the processor saved with the model)
    "vit": ("ViTForImageClassification", "ViTConfig", "ViTImageProcessor", {"size": {"height": 32, "width": 32}}),
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", "CLIPImageProcessor",
             {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", "SiglipImageProcessor", {"size": {"height": 32, "width": 32}}),
}


@pytest.mark.parametrize("kind", sorted(HF_FOLDERS))
def test_hf_save_pretrained_folder_exports_with_its_processor(kind, tmp_path):
    import transformers

    import edgetok.runtime as rt

    cls, cfg_cls, proc_cls, proc_args = HF_FOLDERS[kind]
    cfg = getattr(transformers, cfg_cls)(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=8)
    torch.manual_seed(3)
    model = getattr(transformers, cls)(cfg).eval()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, **({"max_shard_size": "50KB"} if kind == "vit" else {}))  # vit: sharded
    assert (folder / "model.safetensors.index.json").is_file() == (kind == "vit")
    processor = getattr(transformers, proc_cls)(**proc_args)
    processor.save_pretrained(folder)
    assert main(["export", "--model", str(folder), "--method", "tome", "--r", "2", "-o", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["seed"] is None and "preprocessor_config.json" in manifest["preprocessing"]["source"]
    import edgetok

    reduced = edgetok.apply(model, "tome", r=2)
    photo = np.random.default_rng(1).integers(0, 256, (45, 60, 3)).astype(np.uint8)
    x = processor(images=photo, return_tensors="pt").pixel_values
    with torch.no_grad():
        want = reduced(x)
    want = (want.logits if hasattr(want, "logits") else want.last_hidden_state).numpy()
    got = rt.load(tmp_path / "out", backend="ort-cpu").run(photo)
    assert np.abs(got[list(got)[0]] - want).max() <= 1e-4  # the processor's preprocessing, in the runtime


def test_hf_weights_with_the_models_own_names(tmp_path, capsys):
    import transformers
    from safetensors.torch import save_file

    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8, num_labels=5)
    torch.manual_seed(4)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**cfg)).eval()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = f"hf:ViTForImageClassification:{tmp_path / 'config.json'}"
    assert main(["export", "--model", spec, "--weights", str(tmp_path / "model.safetensors"), "--method", "none",
                 "-o", str(tmp_path / "out")]) == 0
    from edgetok.patch.models import create_model

    loaded = create_model(spec, weights=tmp_path / "model.safetensors")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    other = {k.replace("vit.", "backbone."): v for k, v in model.state_dict().items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    fails_in_one_line(capsys, ["export", "--model", spec, "--weights", str(tmp_path / "other.safetensors"),
                               "-o", str(tmp_path / "x")], "fit neither the model")
