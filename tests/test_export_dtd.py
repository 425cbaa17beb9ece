"""Export of the streaming DTD step (edgetok/export/dtd.py): ORT CPU matches
DTDStream frame by frame (static, partly changed, new; threshold 0 keeps all),
checker, one DiffDrop body, the CLI, and edgetok.runtime.StreamSession on it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import edgetok
import edgetok.runtime as rt
from edgetok.cli import main
from edgetok.export.dtd import OUTPUTS, export_dtd_step, frames
from edgetok.export.exporter import ExportError

pytestmark = pytest.mark.slow

SHAPE = (3, 32, 32)
TINY = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
CLI_MODEL = ["--model", "vit_tiny_patch16_224",
             *[a for k, v in TINY.items() if k != "pretrained" for a in ("--model-arg", f"{k}={v}")]]


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **TINY).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtd")
    return {t: export_dtd_step(vit(), root / f"t{t}", threshold=t, check_parity=False) for t in (0.0, 0.05)}


def ort_clip(path, clip):
    """The exported step over ``clip``, its tokens fed back, zeros on the first frame."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    prev, outs = None, []
    for x in clip:
        prev = np.zeros((x.shape[0], 17, 32), np.float32) if prev is None else prev
        got = dict(zip(OUTPUTS, sess.run(list(OUTPUTS), {"pixel_values": x.numpy(), "prev_tokens": prev})))
        prev = got["tokens"]
        outs.append(got)
    return outs


@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_ort_step_matches_dtd_stream(exported, threshold):
    clip = frames(SHAPE, batch=2)  # new, static, stream 0 partly changed, new
    got = ort_clip(exported[threshold].onnx_path, clip)
    stream = edgetok.apply(vit(), "dtd", threshold=threshold, streaming=True).eval()
    counts = []
    for t, (x, g) in enumerate(zip(clip, got)):
        with torch.no_grad():
            ref = [v.numpy() for v in stream(x)]
        assert g["kept_tokens"].shape == ref[0].shape, t
        assert np.abs(g["kept_tokens"] - ref[0]).max(initial=0) <= 1e-4
        assert np.array_equal(g["kept_idx"], ref[1]) and np.array_equal(g["kept_count"], ref[2])
        assert np.abs(g["tokens"] - stream.prev_feats.numpy()).max() <= 1e-4
        counts.append(g["kept_count"].tolist())
    if threshold == 0.0:  # keeps every token of every frame
        assert all(c == [17, 17] for c in counts)
    else:
        assert counts[0] == [17, 17] and counts[1] == [1, 1]  # first frame all; static: only the class token
        assert 1 < counts[2][0] < 17 and counts[2][1] == 1 and counts[3][0] > 1
        assert (got[2]["kept_idx"][1, 1:] == -1).all() and (got[2]["kept_tokens"][1, 1:] == 0).all()  # padding


def test_checker_body_and_manifest(exported, tmp_path):
    res = exported[0.05]
    onnx.checker.check_model(str(res.onnx_path), full_check=True)
    m = res.manifest.model_dump(mode="json")
    assert [n["op_type"] for n in m["edgetok_ops"]] == ["DiffDrop"] and m["function_bodies"] == ["DiffDrop"]
    attrs = m["edgetok_ops"][0]["attributes"]
    assert attrs["plugin_namespace"] == "edgetok" and attrs["protect_first"] == 1
    assert abs(attrs["threshold"] - 0.05) < 1e-7
    proto = onnx.load(str(res.onnx_path))
    assert sum(f.name == "DiffDrop" and f.domain == "edgetok" for f in proto.functions) == 1
    assert [i.name for i in proto.graph.input] == ["pixel_values", "prev_tokens"]
    s = m["stream"]
    assert s["kind"] == "dtd" and s["state_input"] == {"name": "prev_tokens", "shape": ["batch", 17, 32],
                                                      "dtype": "float32"}
    assert (s["state_output"], s["tokens"], s["idx"], s["count"]) == ("tokens", "kept_tokens", "kept_idx",
                                                                       "kept_count")
    assert m["input"]["name"] == "pixel_values" and [o["name"] for o in m["outputs"]] == list(OUTPUTS)
    trt = export_dtd_step(vit(), tmp_path / "trt", threshold=0.05, target="trt")
    # no DiffDrop plugin exists: the trt target keeps its body, and the manifest says it runs from it
    assert trt.manifest.function_bodies == ["DiffDrop"] and trt.manifest.plugin_ops == []
    assert trt.parity["checked_on"] == "portable"


def test_refuses_what_cannot_export(tmp_path):
    with pytest.raises(ExportError, match="threshold 1.5 > 1"):
        export_dtd_step(vit(), tmp_path / "a", threshold=1.5)
    with pytest.raises(ExportError, match="mode 'pixel'"):
        export_dtd_step(edgetok.apply(vit(), "dtd", threshold=0.1, mode="pixel", streaming=True), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_cli_and_stream_session(tmp_path, capsys):
    out, weights = tmp_path / "step", tmp_path / "vit.pt"
    torch.save(vit().state_dict(), weights)  # the CLI's model is vit()
    rc = main(["export", *CLI_MODEL, "--weights", str(weights), "--method", "dtd", "--threshold", "0.05",
               "--output", str(out)])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "dtd" and m["params"]["threshold"] == 0.05 and m["parity"]["frames"] == 4
    assert "prev_tokens" in capsys.readouterr().err
    # the runtime runs the step as is: previous tokens fed back, zeros on the first frame
    sess = rt.StreamSession(rt.load(out, backend="ort-cpu", preprocess=False))
    clip = frames(SHAPE, batch=1)
    results = [sess.step(x.numpy()) for x in clip]
    stream = edgetok.apply(vit(), "dtd", threshold=0.05, streaming=True).eval()
    for r, x in zip(results, clip):
        with torch.no_grad():
            tokens, idx, count = stream(x)
        assert r.kept == int(count[0]) and np.array_equal(r.positions, idx[0].numpy())
        assert np.abs(r.tokens - tokens[0].numpy()).max() <= 1e-4
    assert sess.kept_per_frame[:2] == [17, 1]
    # every runner takes the state the same way (infer(x, **state)): the same step in torch keeps the same tokens
    from edgetok.export.dtd import DTDStep

    torch_sess = rt.StreamSession(rt.load(out, backend="torch", module=DTDStep(stream).eval(), preprocess=False))
    for r, x in zip(results, clip):
        t = torch_sess.step(x.numpy())
        assert t.kept == r.kept and np.array_equal(t.positions, r.positions)
        assert np.abs(t.tokens - r.tokens).max() <= 1e-4
    with pytest.raises(edgetok.errors.EdgetokError, match="threshold=0.05 inside its graph"):
        rt.StreamSession(rt.load(out, backend="ort-cpu"), threshold=0.2)
    assert main(["export", *CLI_MODEL, "--method", "dtd", "--threshold", "0.1,0.2",
                 "--output", str(tmp_path / "bad")]) == 2  # a usage error, before the model is built
