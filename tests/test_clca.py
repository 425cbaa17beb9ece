"""CLCA (cross-layer cache + aggregation head, edgetok/reduce/clca.py) on tiny random timm ViTs:
an independent naive forward (explicit softmax attention, per-sample naive drop/ToMe, the head
written out in float64) matches edgetok's for drop and ToMe bases; the cache switched off gives
the base model back; composition with every ViT block method; exact token/FLOPs accounting;
ONNX export with ORT parity and a TensorRT-RTX build; errors; and edgetok finetune (real
training, atomic and resumable checkpoints, bad input)."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

import edgetok
from edgetok.errors import EdgetokError, InputShapeError, ScheduleError, UnknownMethodError

import manual
from conftest import tiny_vit

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 16 patches + class token
TOL = 1e-5


def randomise_head(model, seed=0):
    """Non-trivial BatchNorm statistics and weights, so the head's every term is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.clca.head.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
        model.clca.head.fc.weight.copy_(torch.randn(model.clca.head.fc.weight.shape, generator=g) * 0.1)
        model.clca.carrier_tokens.add_(torch.randn(model.clca.carrier_tokens.shape, generator=g))
    return model


# -- the naive reference ---------------------------------------------------------------------------
def naive_head(head, feats):
    """The CLA head written out: BatchNorm, per-channel weighting of the L layers, BatchNorm, GELU, linear."""
    f = torch.stack(feats, dim=-1).double()  # [B, C, L]

    def bn(v, m):
        return ((v - m.running_mean.double()[:, None]) / torch.sqrt(m.running_var.double()[:, None] + m.eps)
                * m.weight.double()[:, None] + m.bias.double()[:, None])

    f = bn(f, head.norm_in)
    w, bias = head.mix.weight.double(), head.mix.bias.double()  # [C*width, 1, L]
    width = w.shape[0] // f.shape[1]
    mixed = torch.stack([(f[:, oc // width, :] * w[oc, 0]).sum(-1) + bias[oc] for oc in range(w.shape[0])], dim=1)
    mixed = bn(mixed[..., None], head.norm_mid)[..., 0]
    act = 0.5 * mixed * (1 + torch.erf(mixed / math.sqrt(2)))
    return act @ head.fc.weight.double().T + head.fc.bias.double()


def naive_clca(model, parts, x, step, prop_attn, recover, summary, carriers, gap, has_cls=True):
    """CLCA from its description: carriers appended; each block's base step sees only the prefix +
    image tokens (its scores from their q/k), the cache tokens are appended back; after a recovery
    block the snapshots cached since the last one join the sequence; the head reads the class token
    (or the size-weighted image mean) after the summary blocks."""
    p = model.num_prefix_tokens
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    b = h.shape[0]
    h = torch.cat([h, parts.carrier_tokens.expand(b, -1, -1)], dim=1)
    size = torch.ones(b, h.shape[1], 1)
    tail, cache, feats = carriers, [], []
    last = max(recover) if recover and (carriers or gap) else -1
    for i, blk in enumerate(model.blocks):
        hn = blk.norm1(h)
        o, _, _ = manual.attention(blk, hn, size, prop_attn)
        h = h + blk.ls1(o)
        n = h.shape[1] - tail
        _, metric, attn = manual.attention(blk, hn[:, :n], size[:, :n], prop_attn)
        res = step(i, h[:, :n], size[:, :n], metric, attn)
        if res is not None:
            h = torch.cat([res[0].float(), h[:, n:]], dim=1)
            size = torch.cat([res[1].float(), size[:, n:]], dim=1)
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        main = h.shape[1] - tail
        if i in recover and cache:
            for c in cache:
                h = torch.cat([h, c], dim=1)
                size = torch.cat([size, torch.ones(b, c.shape[1], 1)], dim=1)
                tail += c.shape[1]
            cache = []
        if i < last:
            snap = []
            if gap:
                snap.append(((h[:, p:main] * size[:, p:main]).sum(1) / size[:, p:main].sum(1))[:, None])
            if carriers:
                snap.append(h[:, main:main + carriers])
            cache.append(torch.cat(snap, dim=1))
        if i in summary:
            feats.append(h[:, 0] if has_cls else (h[:, p:main] * size[:, p:main]).sum(1) / size[:, p:main].sum(1))
    return naive_head(parts.head, feats).float(), h, size


CASES = {  # name -> (base, params, naive step(protect), prop_attn, recover, summary)
    "drop": ("drop", dict(keep_rate=0.5, layers=[1, 2]), lambda p: manual.drop_step([None, 9, 5, None], p, False),
             False, [1, 2], [1, 2, 3]),
    "drop-fused": ("drop", dict(keep_rate=0.5, layers=[1], base_params=dict(fuse_dropped=True)),
                   lambda p: manual.drop_step([None, 9, None, None], p, True), False, [1], [1, 3]),
    "tome": ("tome", dict(r=[0, 3, 2, 2]), lambda p: manual.tome_step([0, 3, 2, 2], p), True, [1, 2], [1, 2, 3]),
}


@pytest.mark.parametrize("gap", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_matches_naive_reference(case, gap):
    base, params, step, prop, recover, summary = CASES[case]
    model = tiny_vit(depth=4)
    clca = randomise_head(edgetok.apply(model, "clca", base=base, gap=gap, carriers=2, **params))
    assert clca.clca.recover_at == recover and clca.clca.summary_layers == summary
    with torch.no_grad():
        ref, ref_tokens, ref_size = naive_clca(model, clca.clca, X, step(1), prop, recover, summary, 2, gap)
        out = clca.forward_clca(X)
    assert out.tokens.shape == ref_tokens.shape
    assert (out.tokens - ref_tokens).abs().max() <= TOL
    assert (out.size - ref_size).abs().max() <= TOL
    assert (out.logits - ref).abs().max() <= TOL
    assert out.tokens.shape[1] == clca.clca.schedule.final


def test_no_class_token_model_aggregates_the_image_mean():
    model = tiny_vit(depth=4, class_token=False, global_pool="avg")
    clca = randomise_head(edgetok.apply(model, "clca", base="tome", r=[0, 3, 2, 2]))
    with torch.no_grad():
        ref, ref_tokens, _ = naive_clca(model, clca.clca, X, manual.tome_step([0, 3, 2, 2], 0), True, [1, 2],
                                        [1, 2, 3], 1, False, has_cls=False)
        out = clca.forward_clca(X)
    assert (out.tokens - ref_tokens).abs().max() <= TOL and (out.logits - ref).abs().max() <= TOL


def test_without_cache_and_with_the_kept_classifier_it_is_the_base_model():
    """carriers=0, gap=False: no cache tokens, so the backbone is the base reduction's; with
    keep_classifier the new head starts at zero, so the logits are the base model's."""
    model = tiny_vit(depth=4)
    base = edgetok.apply(model, "drop", keep_rate=0.5, layers=[1, 2])
    clca = edgetok.apply(model, "clca", base="drop", keep_rate=0.5, layers=[1, 2], carriers=0, keep_classifier=True)
    with torch.no_grad():
        tokens, size = base.forward_tokens(X)
        out = clca.forward_clca(X)
        assert torch.equal(out.tokens, tokens) and torch.equal(out.size, size)
        assert (clca(X) - base(X)).abs().max() <= 1e-6


def test_applies_to_an_already_reduced_model_and_leaves_it_alone():
    model = tiny_vit(depth=4)
    base = edgetok.apply(model, "drop", keep_rate=0.5, layers=[1, 2])
    before = base(X)
    a = edgetok.apply(base, "clca", seed=3)
    b = edgetok.apply(model, "clca", base="drop", keep_rate=0.5, layers=[1, 2], seed=3)
    with torch.no_grad():
        assert torch.equal(a(X), b(X))
        assert torch.equal(base(X), before) and base.blocks[1].token_reducer.__class__.__name__ == "TokenDrop"
    assert a.edgetok_plan.params["base"] == "drop" and a.edgetok_plan.params["base_params"]["layers"] == [1, 2]


COMPOSE = {  # every ViT block method, on a 2-block model (reductions in block 0, recovered after it)
    "tome": dict(r=2), "drop": dict(keep_rate=0.6, fuse_dropped=True), "dymu": dict(threshold=0.2),
    "divprune": dict(keep_rate=0.5, layers=[0]), "hired": dict(keep_rate=0.5, layer=0),
    "zero_tprune": dict(r_importance=[2, 0], r_similarity=[2, 1], iterations=3),
    "diffrate": dict(prune=[2, 1], merge=[1, 2]), "slim": dict(keep_rate=0.5, layers=[0], dim=32),
    "mustdrop": dict(merge_r=3, merge_layer=0, keep_rate=0.5, drop_layers=[1]), "tail_drop": dict(keep_rate=0.5, layer=0),
}


def test_every_vit_block_method_is_composed_here():
    from edgetok.reduce.registry import get_method

    blocks = {n for n in edgetok.methods() if get_method(n).kind == "blocks"} - {"vlm_output"}
    assert blocks <= set(COMPOSE), f"add {sorted(blocks - set(COMPOSE))} to COMPOSE"


@pytest.mark.parametrize("method", sorted(COMPOSE))
def test_composes_with_every_vit_block_method(method):
    """The base reduction of the image tokens is untouched by the cache: same counts, and the
    cache adds exactly what the schedule says."""
    from edgetok.patch.clca import flops as clca_flops

    model = tiny_vit(depth=2)
    torch.manual_seed(0)
    base = edgetok.apply(model, method, **COMPOSE[method])
    torch.manual_seed(0)
    clca = edgetok.apply(model, "clca", base=method, base_params=COMPOSE[method])
    with torch.no_grad():
        tokens, _ = base.forward_tokens(X)
        out = clca.forward_clca(X)
    assert torch.isfinite(out.logits).all() and out.logits.shape == (2, 5)
    assert out.main == tokens.shape[1], "the cache changed the base reduction's token count"
    sched = clca.clca.schedule
    assert out.tokens.shape[1] - out.main == sched.trailing[-1] + sched.recovered[-1]
    report = clca_flops(clca)
    assert report.tokens[0] == 17 + 1 and report.total > 0


def test_token_and_flops_accounting_is_exact():
    """Tokens each block's attention and MLP really see (hooks on its two norms) = the schedule,
    and the FLOPs follow from them."""
    from edgetok.patch.clca import flops as clca_flops
    from edgetok.reduce import flops as F

    model = tiny_vit(depth=4)
    clca = edgetok.apply(model, "clca", base="drop", keep_rate=0.5, layers=[1, 2], gap=True)
    seen = {}
    hooks = [getattr(b, name).register_forward_pre_hook(lambda m, a, key=(i, name): seen.__setitem__(key, a[0].shape[1]))
             for i, b in enumerate(clca.blocks) for name in ("norm1", "norm2")]
    with torch.no_grad():
        clca(X)
    for h in hooks:
        h.remove()
    sched = clca.clca.schedule
    assert [seen[(i, "norm1")] for i in range(4)] == sched.tokens_in == [18, 18, 12, 10]
    assert [seen[(i, "norm2")] for i in range(4)] == sched.step_out == [18, 10, 8, 10]
    report = clca_flops(clca)
    info = edgetok.patch.adapter_for(model).info(model)
    attn = sum(2 * n * info.attn_weights + 4 * n * n * info.heads * info.head_dim for n in sched.tokens_in)
    mlp = sum(2 * n * info.mlp_weights for n in sched.step_out)
    assert report.total == report.embed + attn + mlp + sum(l.reduction for l in report.layers)
    assert report.ratio_to(F.count(info, [None] * 4)) > 1.0


def test_export_matches_torch_in_onnxruntime_and_builds_in_tensorrt_rtx(tmp_path):
    from edgetok.export.exporter import export_model

    model = tiny_vit(depth=2)
    clca = randomise_head(edgetok.apply(model, "clca", base="tome", r=[3, 0], gap=True, carriers=2))
    res = export_model(clca, tmp_path / "clca", parity_batches=[1, 3])
    assert max(res.parity["max_abs_err"].values()) <= 1e-4
    assert [n["op_type"] for n in res.manifest.edgetok_ops] == ["TokenMerge"]
    assert res.manifest.method == "clca" and res.manifest.params["base"] == "tome"
    if importlib.util.find_spec("tensorrt_rtx_bindings") is None:
        pytest.skip("TensorRT-RTX is not installed: pip install 'edgetok[rtx]'")
    from edgetok.config import load_config
    from edgetok.trt import build

    config = load_config("rtx").model_copy(update={"precision": "fp32", "compute_capabilities": (86,),
                                                   "batch": load_config("rtx").batch.model_copy(
                                                       update={"min": 1, "opt": 2, "max": 4})})
    built = build(res.output_dir, config, force=True)
    assert built.kind == "engine" and built.path.stat().st_size > 0, built.message


def test_errors_name_the_problem():
    model = tiny_vit(depth=4)
    with pytest.raises(UnknownMethodError, match="registered methods"):
        edgetok.apply(model, "clca", base="nope")
    with pytest.raises(ScheduleError, match="ViT block methods"):
        edgetok.apply(model, "clca", base="dtd")
    with pytest.raises(ScheduleError, match="needs a base reduction"):
        edgetok.apply(model, "clca")
    reduced = edgetok.apply(model, "drop", keep_rate=0.5)
    with pytest.raises(ScheduleError, match="already reduced"):
        edgetok.apply(reduced, "clca", base="tome", r=2)
    with pytest.raises(ScheduleError, match="already reduced"):
        edgetok.apply(reduced, "clca", keep_rate=0.25)
    with pytest.raises(ScheduleError, match="already has CLCA"):
        edgetok.apply(edgetok.apply(reduced, "clca"), "clca")
    with pytest.raises(ScheduleError, match="no recovery layer"):
        edgetok.apply(model, "clca", base="none")
    with pytest.raises(ScheduleError, match="outside"):
        edgetok.apply(model, "clca", base="none", recover_at=[7])
    with pytest.raises(EdgetokError, match="has no parameter"):
        edgetok.apply(model, "clca", base="tome", layers=[1])
    unreduced = edgetok.apply(model, "clca", base="none", recover_at=[1])
    assert unreduced(X).shape == (2, 5) and unreduced.clca.schedule.step_out == [18, 18, 19, 19]


# -- edgetok finetune ------------------------------------------------------------------------------
def tiny_data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g)


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_finetune_trains_and_resumes_exactly(tmp_path):
    from edgetok.commands.finetune import Recipe, finetune

    x, y = tiny_data()
    recipe = Recipe(steps=4, batch_size=8, train="all")
    build = lambda: edgetok.apply(tiny_vit(depth=3), "clca", base="drop", keep_rate=0.5, layers=[1])
    torch.manual_seed(0)
    straight = build()
    before = state_of(straight)
    seen = []
    finetune(straight, x, y, recipe, progress=seen.append)
    assert [s["step"] for s in seen] == [1, 2, 3, 4] and all(math.isfinite(s["loss"]) for s in seen)
    after = state_of(straight)
    assert not torch.equal(before["clca.head.fc.weight"], after["clca.head.fc.weight"])
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    assert not torch.equal(before["clca.carrier_tokens"], after["clca.carrier_tokens"])

    ckpt = tmp_path / "run" / "ckpt.pt"

    def stop_at_2(info):
        if info["step"] == 2:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    interrupted = build()
    with pytest.raises(KeyboardInterrupt):
        finetune(interrupted, x, y, recipe, checkpoint=ckpt, every=1, progress=stop_at_2)
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    torch.manual_seed(0)
    resumed = build()
    res2 = finetune(resumed, x, y, recipe, checkpoint=ckpt, every=1)
    assert res2["resumed_from"] == 2
    for k, v in state_of(resumed).items():
        assert torch.allclose(v, after[k], atol=1e-6), k
    assert [h[0] for h in res2["history"]] == [1, 2, 3, 4]
    assert sorted(os.listdir(ckpt.parent)) == ["ckpt.pt"]  # no temporary files left
    with pytest.raises(EdgetokError, match="another recipe"):
        finetune(build(), x, y, Recipe(steps=5, batch_size=8), checkpoint=ckpt)


def test_head_only_finetuning_leaves_the_backbone(tmp_path):
    from edgetok.commands.finetune import Recipe, finetune

    x, y = tiny_data()
    model = edgetok.apply(tiny_vit(depth=3), "tome", r=2)
    before = state_of(model)
    finetune(model, x, y, Recipe(steps=2, batch_size=8, train="head"))
    after = state_of(model)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("head."))


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    from edgetok.commands import finetune as ft
    from edgetok.runtime import artifacts

    path = tmp_path / "ckpt.pt"
    ft.save_atomic({"step": 1}, path)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", fail)  # save_atomic writes through write_atomic
    with pytest.raises(OSError, match="disk full"):
        ft.save_atomic({"step": 2}, path)
    assert torch.load(path)["step"] == 1  # the old checkpoint, whole
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_finetune_rejects_bad_input(tmp_path):
    from edgetok.commands.finetune import DataError, Recipe, finetune, load_npz

    model = tiny_vit(depth=2)
    x, y = tiny_data(8)
    with pytest.raises(DataError, match="labels"):
        finetune(model, x, None, Recipe(steps=1))
    with pytest.raises(InputShapeError, match=r"model takes \[3, 32, 32\]"):
        finetune(model, torch.randn(8, 3, 16, 16), y, Recipe(steps=1))
    with pytest.raises(DataError, match="outside the model's 5 classes"):
        finetune(model, x, torch.full((8,), 7), Recipe(steps=1))
    with pytest.raises(EdgetokError, match="train="):
        Recipe(train="backbone")
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="no 'labels' array"):
        load_npz(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "gray.npz", images=np.zeros((4, 32, 32), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(InputShapeError, match=r"\[N,H,W,3\]"):
        load_npz(tmp_path / "gray.npz")


def test_finetune_cli(tmp_path):
    from edgetok.cli import main

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", images=rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(16) % 5)
    (tmp_path / "model.json").write_text(json.dumps({
        "architecture": {"img_size": 32, "patch_size": 8, "num_classes": 5, "embed_dim": 32, "depth": 3,
                         "num_heads": 2}, "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    args = [str(tmp_path / "data.npz"), "--model-config", str(tmp_path / "model.json"), "--method", "clca",
            "--param", "base=drop", "--param", "keep_rate=0.5", "--param", "layers=[1]", "--steps", "2",
            "--batch-size", "4", "--subset", "even", "--eval-subset", "odd", "--checkpoint",
            str(tmp_path / "ck.pt"), "--json-out", str(tmp_path / "out.json")]
    assert main(["finetune", *args]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert 0.0 <= out["top1"] <= 1.0 and len(out["history"]) == 2
    assert torch.load(tmp_path / "ck.pt", weights_only=False)["meta"]["params"]["base"] == "drop"
    assert main(["finetune", *args[:-2]]) == 0  # resumes: nothing left to do
    assert main(["finetune", *args[:5], "--param", "base=nope", "--steps", "1"]) == 1


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.isdir(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                   "cifar10-vit"))), reason="../shared/data/cifar10-vit is not here")
def test_benchmark_runs_in_tiny_mode(tmp_path):
    """benchmarks/bench_clca.py end to end on 32 + 32 real images, 2 steps (keeps the script working)."""
    import subprocess
    import sys

    # a subprocess: the script gives ONNX Runtime one process-wide thread pool, which would
    # refuse the per-session pools of every later test in this process
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_clca.py")
    out = subprocess.run([sys.executable, path, "--tiny", "--output", str(tmp_path / "clca.json"),
                          "--workdir", str(tmp_path / "work"), "--threads", "1"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "clca.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"unreduced", "unreduced + FT", "drop 0.25", "drop 0.25 + FT", "drop 0.25 + CLCA"}
    assert rows["unreduced"]["ort_speed_ratio"]["1"] == 1.0 and rows["drop 0.25 + CLCA"]["ort_parity_max_abs_err"] <= 1e-4
    assert rows["drop 0.25 + CLCA"]["tokens"][:3] == [66, 66, 19] and rows["drop 0.25"]["flops_ratio"] > 2.5
    assert result["goal"] is not None and "machine" in result
