"""The ViT/VLM token methods (DivPrune, HiRED, Zero-TPrune, DiffRate,
Self-slimmed ViT, MustDrop, VLM output stage): naive-reference match end to end
on tiny timm ViTs, keep-all identity, token counts vs edgetok.flops, errors,
and ONNX export through edgetok.export where it is available."""
import json

import pytest
import torch

import edgetok
from edgetok.errors import EdgetokError, ScheduleError
from edgetok.reduce.base import AttentionContext

import manual
import naive_methods_vit as naive
from conftest import tiny_vit

X = torch.randn(2, 3, 32, 32)  # 4x4 patch grid + class token = 17 tokens
TOL = 1e-5

CASES = {  # method -> (params, naive step factory(protect), prop_attn)
    "divprune": (dict(keep_rate=0.5, layers=[1]), lambda p: naive.divprune_step({1: p + 8}, p), False),
    "hired": (dict(keep_rate=0.5, layer=1, partitions=(2, 2)), lambda p: naive.hired_step(1, p + 8, p, (4, 4), (2, 2)),
              False),
    "zero_tprune": (dict(r_importance=[2, 1, 0], r_similarity=[3, 2, 0], iterations=5),
                    lambda p: naive.zero_tprune_step({0: (2, 3), 1: (1, 2)}, p, 5), False),
    "diffrate": (dict(prune=[2, 1, 0], merge=[2, 3, 1]),
                 lambda p: naive.diffrate_step({0: (2, 2), 1: (1, 3), 2: (0, 1)}, p), True),
    "mustdrop": (dict(merge_r=3, merge_layer=0, keep_rate=0.5, drop_layers=[2]),
                 lambda p: naive.mustdrop_step(0, 3, {2: p + 7}, p, (4, 4)), True),
}


@pytest.mark.parametrize("method", CASES)
@pytest.mark.parametrize("variant", ["cls", "no-cls"])
def test_matches_naive_reference(method, variant):
    kw = {} if variant == "cls" else dict(class_token=False, global_pool="avg")
    model = tiny_vit(**kw)
    params, step, prop = CASES[method]
    p = model.num_prefix_tokens
    reduced = edgetok.apply(model, method, **params)
    with torch.no_grad():
        ref, ref_tokens, ref_size = manual.forward(model, X, step(p), prop_attn=prop)
        out = reduced(X)
        tokens, size = reduced.forward_tokens(X)
    assert tokens.shape == ref_tokens.shape
    assert (tokens - ref_tokens).abs().max() <= TOL
    assert (size - ref_size).abs().max() <= TOL
    assert (out - ref).abs().max() <= TOL


def test_slim_matches_naive_reference():
    model = tiny_vit()
    reduced = edgetok.apply(model, "slim", keep_rate=0.5, layers=[1], dim=32, seed=3)
    layer = reduced.blocks[1].token_reducer.layer
    with torch.no_grad():
        ref, ref_tokens, ref_size = manual.forward(model, X, naive.slim_step({1: layer}, 1), prop_attn=False)
        tokens, size = reduced.forward_tokens(X)
        out = reduced(X)
    assert tokens.shape == (2, 9, 32)
    assert (tokens - ref_tokens).abs().max() <= TOL and (size - ref_size).abs().max() <= TOL
    assert (out - ref).abs().max() <= TOL
    assert torch.allclose(size[:, 1:].sum(1), torch.full((2, 1), 16.0))  # slimmed tokens still stand for 16 patches


def test_slim_loads_sit_state_dicts(tmp_path):
    from edgetok.reduce.slim import SlimmingLayer

    torch.manual_seed(0)
    sd = SlimmingLayer(32, 8).state_dict()
    path = tmp_path / "tsm.pt"
    torch.save([sd], path)
    for weights in ([sd], str(path)):
        reduced = edgetok.apply(tiny_vit(), "slim", keep_rate=0.5, layers=[1], weights=weights)
        assert torch.equal(reduced.blocks[1].token_reducer.layer.weight[1].weight, sd["weight.1.weight"])
    with pytest.raises(ScheduleError, match="fit a slimming layer"):
        edgetok.apply(tiny_vit(), "slim", keep_rate=0.25, layers=[1], weights=[sd])


def _capture_last(model, x):
    """Feature-layer output and attention of the last block, by manual.forward."""
    seen = {}

    def step(i, h, size, metric, attn):
        seen["attn"] = attn
        return None

    with torch.no_grad():
        _, tokens, _ = manual.forward(model, x, step, prop_attn=False)
    return tokens, seen["attn"]


@pytest.mark.parametrize("scorer", ["divprune", "hired", "zero_tprune", "cls_attn"])
def test_vlm_output_matches_naive_reference(scorer):
    model = tiny_vit()
    tower = edgetok.apply(model, "vlm_output", budget=6, scorer=scorer,
                          options={"r_similarity": 4, "iterations": 4} if scorer == "zero_tprune" else None)
    with torch.no_grad():
        tokens, idx = tower(X)
    feats, attn = _capture_last(model, X)
    for b in range(2):
        f, a = feats[b, 1:], attn[b]
        cls = a[:, 0, 1:].double().mean(0)
        if scorer == "divprune":
            kept = naive.divprune(f, 6)
        elif scorer == "hired":
            kept = naive.hired(cls, 6, (4, 4), (2, 2))
        elif scorer == "zero_tprune":
            kept = [i - 1 for i in naive.zero_tprune(a, torch.cat([feats[b, :1], f]), 16 - 6 - 4, 4, 4, 1)]
        else:
            kept = naive._top([float(v) for v in cls], 6)
        assert idx[b].tolist() == sorted(kept)
        assert (tokens[b] - f[sorted(kept)]).abs().max() <= TOL


def test_vlm_output_on_hf_siglip_without_class_token():
    import transformers
    cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=32, patch_size=8)
    tower = transformers.SiglipVisionModel(cfg).eval()
    reduced = edgetok.apply(tower, "vlm_output", budget=5, scorer="hired", feature_layer=-2)
    with torch.no_grad():
        tokens, idx = reduced(pixel_values=X)
        hidden = tower(pixel_values=X, output_hidden_states=True).hidden_states[-2]
    assert tokens.shape == (2, 5, 32)
    assert (tokens - hidden.gather(1, idx[..., None].expand(-1, -1, 32))).abs().max() <= TOL


@pytest.mark.parametrize("method,params", [
    ("divprune", dict(r=0)), ("zero_tprune", dict(r_importance=0, r_similarity=0)), ("hired", dict(keep_rate=1.0)),
    ("diffrate", dict(prune=0, merge=0)), ("mustdrop", dict(merge_r=0, keep_rate=1.0)),
])
def test_no_reduction_equals_original(method, params):
    model = tiny_vit()
    reduced = edgetok.apply(model, method, **params)
    with torch.no_grad():
        assert torch.equal(reduced(X), model(X))


def test_keep_all_steps_are_identity():
    """The scoring code itself at keep = all tokens: every token back, in order."""
    from edgetok.reduce.divprune import DivPruneDrop
    from edgetok.reduce.hired import HiREDDrop
    from edgetok.reduce.zero_tprune import ZeroTPruneDrop

    x = torch.randn(2, 17, 32)
    q, k = torch.randn(2, 2, 17, 16), torch.randn(2, 2, 17, 16)
    size = torch.ones(2, 17, 1)
    for step in (DivPruneDrop(17, 1), HiREDDrop(17, 1, (4, 4), (2, 2)), ZeroTPruneDrop(0, 0, 1, 3)):
        step.keep = 17
        out, s = step(x, size, AttentionContext(q, k, None, 0.25))
        assert torch.equal(out, x) and torch.equal(s, size)


@pytest.mark.parametrize("method", list(CASES) + ["slim"])
def test_token_counts_match_flops(method):
    params = dict(CASES[method][0]) if method in CASES else dict(keep_rate=0.5, layers=[1], dim=32)
    model = tiny_vit(depth=3)
    reduced = edgetok.apply(model, method, **params)
    report = edgetok.flops(reduced)
    assert edgetok.token_counts(reduced, X) == report.tokens
    assert report.total < edgetok.flops(model).total
    assert sum(layer.reduction for layer in report.layers) > 0


def test_diffrate_rate_files(tmp_path):
    model = tiny_vit()
    direct = edgetok.apply(model, "diffrate", prune=[2, 1, 0], merge=[2, 3, 1])
    (tmp_path / "r.json").write_text(json.dumps({"prune": [2, 1, 0], "merge": [2, 3, 1]}))
    # DiffRate's own format: tokens left after each prune / merge, class token included
    (tmp_path / "r.yaml").write_text("prune_kept_num: [15, 12, 9]\nmerge_kept_num: [13, 9, 8]\n")
    with torch.no_grad():
        want = direct(X)
        for name in ("r.json", "r.yaml"):
            got = edgetok.apply(model, "diffrate", rate_file=tmp_path / name)(X)
            assert torch.equal(got, want)
    (tmp_path / "bad.json").write_text(json.dumps({"keep": [1, 2, 3]}))
    with pytest.raises(ScheduleError, match="prune_kept_num"):
        edgetok.apply(model, "diffrate", rate_file=tmp_path / "bad.json")
    with pytest.raises(ScheduleError, match="does not exist"):
        edgetok.apply(model, "diffrate", rate_file=tmp_path / "missing.json")


def test_diffrate_r_splits_into_merge_and_prune():
    """The r= knob the latency-aware search (edgetok.tune.auto) tunes."""
    plan = edgetok.apply(tiny_vit(), "diffrate", r=[3, 2, 0], merge_share=0.5).edgetok_plan
    assert plan.params["merge"] == [2, 1, 0] and plan.params["prune"] == [1, 1, 0]
    with pytest.raises(ScheduleError, match="one of"):
        edgetok.apply(tiny_vit(), "diffrate", r=2, prune=1)


@pytest.mark.parametrize("method,params,match", [
    ("divprune", dict(keep_rate=0.5, r=2), "exactly one of"),
    ("divprune", dict(r=20), "cannot keep"),
    ("hired", dict(partitions=(5, 1)), "partitions"),
    ("hired", dict(layer=7), "outside"),
    ("zero_tprune", dict(r_importance=2, r_similarity=9), "at most half"),
    ("diffrate", dict(), "needs rates"),
    ("diffrate", dict(prune=[2, 2]), "has 2 values"),
    ("diffrate", dict(prune=10, merge=10), "cannot prune"),
    ("slim", dict(keep_rate=0.5, layers=[1]), "pass dim="),
    ("mustdrop", dict(merge_r=9), "neighbour pairs"),
    ("mustdrop", dict(merge_layer=1, drop_layers=[0]), "must come after"),
    ("vlm_output", dict(budget=17), "between 1 and"),
    ("vlm_output", dict(scorer="nope"), "unknown vlm_output scorer"),
    ("vlm_output", dict(scorer="divprune", options={"iterations": 2}), "has no option"),
    ("vlm_output", dict(budget=4, scorer="zero_tprune", options={"r_similarity": 6}), "at most half"),
])
def test_bad_params_raise_clear_errors(method, params, match):
    with pytest.raises(ScheduleError, match=match):
        edgetok.apply(tiny_vit(), method, **params)


def test_vlm_output_zero_tprune_default_split_is_valid_for_small_budgets():
    """Default split: half each, but the S-stage removes at most half of what the I-stage keeps."""
    from edgetok.reduce.vlm_output import zero_tprune_counts

    assert zero_tprune_counts(196, 64, {}) == (68, 64)  # (196-64)//2 = 66 would leave the S-stage too few
    assert zero_tprune_counts(16, 6, {}) == (5, 5)
    tower = edgetok.apply(tiny_vit(), "vlm_output", budget=3, scorer="zero_tprune")
    with torch.no_grad():
        tokens, idx = tower(X)
    assert tokens.shape[1] == 3 and idx.shape == (2, 3)


def test_grid_methods_need_the_grid():
    with pytest.raises(ScheduleError, match="square grid"):
        edgetok.apply(tiny_vit(img_size=(32, 48)), "hired")
    reduced = edgetok.apply(tiny_vit(img_size=(32, 48)), "mustdrop", grid=(4, 6), merge_r=4)
    with torch.no_grad():
        assert reduced(torch.randn(1, 3, 32, 48)).shape == (1, 5)
    with pytest.raises(EdgetokError, match="unreduced tower"):
        edgetok.apply(edgetok.apply(tiny_vit(), "divprune", r=1), "vlm_output")


EXPORTS = {  # method -> (params, edgetok node types expected in the graph)
    "divprune": (dict(keep_rate=0.5, layers=[0]), ["TokenDrop"]),
    "hired": (dict(keep_rate=0.5, layer=0), ["TokenDrop"]),
    "zero_tprune": (dict(r_importance=[2, 0], r_similarity=[2, 1], iterations=3), ["TokenDrop", "TokenDrop"]),
    "diffrate": (dict(prune=[2, 1], merge=[1, 2]), ["TokenDrop", "TokenDrop"]),
    "slim": (dict(keep_rate=0.5, layers=[0], dim=32), []),  # soft aggregation: standard ops only
    "mustdrop": (dict(merge_r=3, merge_layer=0, keep_rate=0.5, drop_layers=[1]), ["TokenDrop", "TokenDrop"]),
    "vlm_output": (dict(budget=5, scorer="divprune"), ["TokenDrop"]),
}


@pytest.mark.parametrize("method", EXPORTS)
def test_export_runs_in_onnxruntime(method, tmp_path):
    import onnxruntime as ort

    from edgetok.export.exporter import export_model

    params, ops = EXPORTS[method]
    model = edgetok.apply(tiny_vit(depth=2), method, **params)
    res = export_model(model, tmp_path / "out", input_shape=(3, 32, 32), check_parity=False)  # own check below
    assert [n["op_type"] for n in res.manifest.edgetok_ops] == ops
    session = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    want = want if isinstance(want, tuple) else (want,)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for w, g in zip(want, got):
        assert w.shape == g.shape
        assert abs(w.double().numpy() - g).max() <= 1e-4


def test_diffrate_rates_from_the_latency_aware_search():
    """edgetok.tune.auto (DiffRate's search stand-in) tunes diffrate's r= per layer."""
    from edgetok.tune import auto

    grid = list(range(1, 18))  # a cost table where a block costs 1 ms per token, a step 0.1 ms
    table = auto.CostTable({"backend": "fake", "batch": 1}, grid, [float(n) for n in grid], [n / 2 for n in grid],
                           [0.1] * len(grid), 0.0)
    model = tiny_vit()
    found = auto.auto_schedule(model, method="diffrate", min_speedup=1.2, table=table, images=X, step=1)
    assert found.reduced and found.goal_met and sum(found.r) > 0
    reduced = edgetok.apply(model, "diffrate", r=found.r)
    assert edgetok.token_counts(reduced, X) == auto.counts_for(found.r, 17)
