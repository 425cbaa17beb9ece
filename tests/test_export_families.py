"""`edgetok export` for the families that are not image ViTs (edgetok/export/families.py):
Focus-DETR on a Hugging Face DETR, MrT5 on a T5 encoder, FlexDiT on the DiT stack.
Each is checked in ONNX Runtime against torch here, independently of the exporter's check."""
import json

import numpy as np
import onnxruntime as ort
import torch

from edgetok.cli import main
from edgetok.patch.models import create_model

T5 = ('hf:T5EncoderModel:{"vocab_size": 259, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 3, '
      '"num_heads": 4, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0}')
DETR = ('hf:DetrModel:{"backbone_config": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], '
        '"depths": [1, 1], "layer_type": "basic", "out_features": ["stage2"]}, "use_timm_backbone": false, '
        '"use_pretrained_backbone": false, "d_model": 32, "encoder_layers": 2, "decoder_layers": 1, '
        '"encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_queries": 10}')
DEFORMABLE_DETR = ('hf:DeformableDetrModel:{"backbone_config": {"model_type": "resnet", "embedding_size": 8, '
                   '"hidden_sizes": [8, 16, 16], "depths": [1, 1, 1], "layer_type": "basic", "out_features": '
                   '["stage1", "stage2", "stage3"]}, "use_timm_backbone": false, "use_pretrained_backbone": false, '
                   '"d_model": 32, "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 2, '
                   '"decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_queries": 5, '
                   '"num_feature_levels": 3, "encoder_n_points": 2, "decoder_n_points": 2}')
DIT = ["--module", "edgetok.patch.dit:DiT", "--model-arg", "depth=4", "--model-arg", "hidden=32",
       "--model-arg", "heads=2"]


def export(tmp_path, *args):
    out = tmp_path / "out"
    return main(["export", *args, "-o", str(out)]), out


def ort_outputs(out, feeds):
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def test_mrt5_t5_encoder_matches_torch_with_padding(tmp_path):
    from edgetok import apply
    from edgetok.export.exporter import export_family

    rc, out = export(tmp_path, "--model", T5, "--method", "mrt5", "--param", "layer=1", "--param", "max_keep=16",
                     "--input-size", "32")
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "hf-t5-encoder" and m["method"] == "mrt5"
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask"]
    assert [o["name"] for o in m["outputs"]] == ["last_hidden_state", "attention_mask_out", "kept_indices"]
    assert [n["op_type"] for n in m["edgetok_ops"]] == ["TokenDrop"] and m["parity"]["max_abs_err"]["2"] <= 1e-4
    # the Python entry point, and a padded batch the exporter's own check did not see
    model = apply(create_model(T5), "mrt5", layer=1, max_keep=16)
    res = export_family(model, tmp_path / "py", input_size=[32])
    ids = torch.randint(3, 259, (2, 32), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 32, dtype=torch.int64)
    mask[1, 25:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
    hidden, kept_mask, _ = ort_outputs(res.output_dir, {"input_ids": ids, "attention_mask": mask})
    assert np.abs(hidden - ref.last_hidden_state.numpy()).max() <= 1e-4
    assert np.array_equal(kept_mask, ref.attention_mask.numpy())


def focus_detr_cli_export(tmp_path, model: str, keep_rate: str, family: str) -> dict:
    """`edgetok export` of a two-layer DETR-style encoder with Focus-DETR at 64x96, batch 1."""
    rc, out = export(tmp_path, "--model", model, "--method", "focus_detr", "--param", f"keep_rate={keep_rate}",
                     "--input-size", "64,96", "--batch", "1")
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == family and m["inputs"][0]["shape"] == [1, 3, 64, 96] and m["seed"] == 0
    assert [n["op_type"] for n in m["edgetok_ops"]] == ["TokenDrop", "TokenDrop"]
    # independently of the exporter's own check: the same seeded model in torch, on an input it did not see
    from edgetok import apply

    ref_model = apply(create_model(model, seed=0), "focus_detr", keep_rate=float(keep_rate))
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_model(pixel_values=x)
    got = dict(zip([o["name"] for o in m["outputs"]], ort_outputs(out, {"pixel_values": x})))
    assert np.abs(got["last_hidden_state"] - ref.last_hidden_state.numpy()).max() <= 1e-4
    return m


def test_focus_detr(tmp_path):
    m = focus_detr_cli_export(tmp_path, DETR, "0.5", "hf-detr")
    assert m["parity"]["batches"] == [1]


def test_focus_deformable_detr(tmp_path):
    focus_detr_cli_export(tmp_path, DEFORMABLE_DETR, "0.4", "hf-deformable-detr")
    # the Python entry point, checked here on an input the exporter's own check did not see
    from edgetok import apply
    from edgetok.export.exporter import export_family

    model = apply(create_model(DEFORMABLE_DETR), "focus_detr", keep_rate=[0.5, 0.3])
    res = export_family(model, tmp_path / "py", input_size=[64, 96], batch=1)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(pixel_values=x)
    names = [o["name"] for o in json.loads((res.output_dir / "manifest.json").read_text())["outputs"]]
    got = dict(zip(names, ort_outputs(res.output_dir, {"pixel_values": x})))
    for name in ("last_hidden_state", "encoder_last_hidden_state"):
        assert np.abs(got[name] - getattr(ref, name).numpy()).max() <= 1e-4


def test_flexdit_one_stage_exports_several_are_refused(tmp_path, capsys):
    rc, out = export(tmp_path, *DIT, "--method", "flexdit")
    assert rc != 0 and not out.exists()
    assert "stages=[[0, 2]]" in capsys.readouterr().err
    rc, out = export(tmp_path, *DIT, "--method", "flexdit", "--param", "stages=[[0, 2]]")
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "dit" and [i["name"] for i in m["inputs"]] == ["x", "t", "y"]
    assert m["params"]["fixed_factor"] == 2


def test_input_size_errors(tmp_path, capsys):
    rc, _ = export(tmp_path, "--model", T5, "--method", "none", "--input-size", "4,4")
    assert rc != 0 and "give L" in capsys.readouterr().err
    rc, _ = export(tmp_path, "--model", "vit_tiny_patch16_224", "--model-arg", "depth=1", "--method", "none",
                   "--input-size", "64,64")
    assert rc != 0 and "img_size" in capsys.readouterr().err
    rc, _ = export(tmp_path, "--module", "torch.nn:Linear", "--model-arg", "in_features=2",
                   "--model-arg", "out_features=2", "--method", "none")
    err = capsys.readouterr().err
    assert rc != 0 and "for export only" in err and "T5EncoderModel" in err and len(err.strip().splitlines()) == 1


def test_auto_schedule_is_refused_for_families(tmp_path, capsys):
    rc, _ = export(tmp_path, "--model", T5, "--method", "tome", "--schedule", "auto", "--target", "cpu-ort",
                   "--min-speedup", "1.2")
    assert rc != 0 and "image ViT" in capsys.readouterr().err
