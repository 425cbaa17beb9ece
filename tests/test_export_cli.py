"""`edgetok export` / `edgetok inspect`: one real export through the CLI, and bad
inputs that must end in one error line, a non-zero exit and no files."""
from __future__ import annotations

import json

import pytest

from edgetok.cli import main

pytestmark = pytest.mark.slow

TINY = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
        "--model-arg", "embed_dim=32", "--model-arg", "depth=2", "--model-arg", "num_heads=2"]


def test_export_and_inspect(tmp_path, capsys):
    out = tmp_path / "nested" / "drop"
    rc = main(["export", *TINY, "--method", "drop", "--keep-rate", "0.7", "--config", "jetson-orin-nano",
               "--output", str(out)])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"] == "trt" and m["opset"] == 17 and m["config"] == "jetson-orin-nano"
    assert m["batch_profile"] == {"min": 1, "opt": 1, "max": 4} and m["function_bodies"] == []
    assert m["model"] == "vit_tiny_patch16_224" and m["method"] == "drop"
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert [n["op_type"] for n in s["edgetok_nodes"]] == ["TokenDrop"]
    node = s["edgetok_nodes"][0]
    assert node["tokens_in"] == 17 and node["tokens_out"] == 13 and node["body"] is False
    assert "without bodies" in s["form"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "vit_nonexistent_patch99"], "unknown model 'vit_nonexistent_patch99'"),
        ([*TINY, "--method", "tomee"], "unknown method 'tomee'"),
        ([*TINY, "--config", "jetson-nano-2gb"], "unknown export config 'jetson-nano-2gb'"),
        ([*TINY, "--r", "99", "--strict"], "cannot merge r=99"),  # without --strict: clamped (test_tome_clamp.py)
        (["--model", "hf:NoSuchModel"], "transformers has no model class"),
        (["--module", "collections:OrderedDict"], "not a torch.nn.Module"),
        (["--model", "resnet18"], "no adapter"),
        ([*TINY, "--weights", "missing.safetensors"], "does not exist"),
    ],
)
def test_bad_inputs_fail_cleanly(tmp_path, capsys, args, words):
    out = tmp_path / "out"
    rc = main(["export", *args, "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert words in err[-1] and err[-1].startswith("error:")
    assert list(tmp_path.iterdir()) == []


def test_bad_config_key(tmp_path, capsys):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("description: x\nruntime: onnxruntime\ndevice: cpu\ntarget: portable\nopset: 18\n"
                   "precision: fp32\nbatch: {min: 1, opt: 1, max: 2}\nworkspace: 3\n")
    rc = main(["export", *TINY, "--config", str(cfg), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "mine.yaml" in err and "unknown key 'workspace'" in err and "workspace_mib" in err
    assert not (tmp_path / "out").exists()


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = main(["export", *TINY, "--r", "2", "--output", str(blocker / "sub" / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith("error: cannot write to")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_help_documents_every_option():
    import click

    from edgetok.commands.export import export

    ctx = click.Context(export)
    undocumented = [p.name for p in export.params if isinstance(p, click.Option) and not p.help]
    assert not undocumented
    text = export.get_help(ctx)
    for opt in ("--model", "--module", "--weights", "--method", "--r", "--keep-rate", "--threshold", "--config",
                "--target", "--batch", "--output"):
        assert opt in text
