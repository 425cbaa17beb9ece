"""Issue 22, item 4: an r beyond what a layer can merge. edgetok.apply stays strict (an error
naming clamp=True and --strict); clamp=True records which layers merged fewer than r and the
tokens left, and clamp_note turns that into the one line `edgetok export` prints when it
clamps (its default unless --strict), which the last test runs."""
import json

import pytest

import edgetok
from edgetok.errors import ScheduleError
from edgetok.reduce.registry import takes_param
from edgetok.reduce.tome import clamp_note


def test_clamp_note_names_layers_and_tokens_left(vit):  # 17 tokens, 1 protected, 3 blocks
    with pytest.raises(ScheduleError, match=r"layer 1: cannot merge r=6 tokens out of 11 .*unless --strict"):
        edgetok.apply(vit, "tome", r=6)
    plan = edgetok.apply(vit, "tome", r=6, clamp=True).edgetok_plan
    assert plan.params["r"] == [6, 5, 2]
    assert plan.summary["clamped"] == {"tokens_left": 4, "layers": [
        {"layer": 1, "r": 6, "merged": 5, "tokens_in": 11}, {"layer": 2, "r": 6, "merged": 2, "tokens_in": 6}]}
    note = clamp_note(plan)
    assert "layer 1 merged 5 of r=6" in note and "layer 2 merged 2 of r=6" in note and "layer 0" not in note
    assert "4 tokens remain" in note and "--strict" in note


def test_no_note_when_nothing_is_clamped(vit):
    assert clamp_note(edgetok.apply(vit, "tome", r=2, clamp=True).edgetok_plan) is None
    assert clamp_note(None) is None


def test_only_methods_with_clamp_take_it():
    assert takes_param("tome", "clamp") and not takes_param("drop", "clamp")


def test_export_cli_clamps_with_a_note_unless_strict(tmp_path, capsys):
    from edgetok.cli import main

    tiny = ["export", "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
            "--model-arg", "depth=3", "--model-arg", "num_classes=5", "--method", "tome", "--r", "6", "--no-parity"]
    assert main([*tiny, "--strict", "-o", str(tmp_path / "strict")]) != 0
    assert "layer 1: cannot merge r=6 tokens out of 11" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "model.onnx").exists()
    assert main([*tiny, "-o", str(tmp_path / "clamped")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "note: r clamped" in err and "layer 1 merged 5 of r=6" in err and "4 tokens remain" in err
    manifest = json.loads((tmp_path / "clamped" / "manifest.json").read_text())
    assert manifest["params"]["r"] == [6, 5, 2] and manifest["tokens"] == [17, 11, 6, 4]
