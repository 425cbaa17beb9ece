"""edgetok.apply on timm ViTs: equivalence to a hand-written reduced forward,
r=0 identity, token counts vs edgetok.flops, variants, and clear errors."""
import copy

import pytest
import torch

import edgetok
from edgetok.errors import EdgetokError, InputShapeError, ScheduleError, UnknownMethodError, UnsupportedModelError
from edgetok.reduce import Linear
from edgetok.tune.calibrate import calibrate

import manual
from conftest import tiny_vit

X = torch.randn(2, 3, 32, 32)
VARIANTS = {
    "vit": {},
    "no-class-token": dict(class_token=False, global_pool="avg"),
    "registers": dict(reg_tokens=4, init_values=1e-2),  # DINOv2-style: layer scale + registers
    "deit-distilled": dict(name="deit_tiny_distilled_patch16_224"),
    "avg-pool-with-cls": dict(global_pool="avg"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method,params", [
    ("tome", dict(r=0)), ("drop", dict(r=0)), ("dymu", dict(threshold=1.0)),
])
def test_no_reduction_equals_original(variant, method, params):
    model = tiny_vit(**VARIANTS[variant])
    reduced = edgetok.apply(model, method, **params)
    with torch.no_grad():
        assert torch.equal(reduced(X), model(X))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tome_matches_hand_written_forward(variant):
    model = tiny_vit(**VARIANTS[variant])
    protect = model.num_prefix_tokens
    rs = [3, 2, 2]
    reduced = edgetok.apply(model, "tome", r=rs)
    with torch.no_grad():
        ref, ref_tokens, ref_size = manual.forward(model, X, manual.tome_step(rs, protect))
        out = reduced(X)
        tokens, size = reduced.forward_tokens(X)
    assert (out - ref).abs().max() <= 1e-5
    assert (tokens - ref_tokens).abs().max() <= 1e-5
    assert torch.equal(size, ref_size)


@pytest.mark.parametrize("fuse", [False, True])
def test_drop_matches_hand_written_forward(fuse):
    model = tiny_vit()
    reduced = edgetok.apply(model, "drop", r=[4, 0, 3], fuse_dropped=fuse)
    keeps = [17 - 4, None, 17 - 4 + int(fuse) - 3]
    with torch.no_grad():
        ref, _, _ = manual.forward(model, X, manual.drop_step(keeps, 1, fuse), prop_attn=False)
        out = reduced(X)
    assert (out - ref).abs().max() <= 1e-5


def test_dymu_batch_padding_does_not_leak():
    """Images reduced together (padded to the batch maximum) give the same
    outputs as each image alone: padding takes no part in attention or pooling."""
    torch.manual_seed(1)
    for pool in ("token", "avg"):
        model = tiny_vit(global_pool=pool, depth=4)
        x = torch.randn(3, 3, 32, 32)
        x[1] = x[1].mean()  # a flat image merges much more than noise
        thresholds = calibrate(model, x, r=3)
        reduced = edgetok.apply(model, "dymu", threshold=thresholds)
        with torch.no_grad():
            together = reduced(x)
            alone = torch.cat([reduced(x[i : i + 1]) for i in range(3)])
            counts = [edgetok.token_counts(reduced, x[i : i + 1])[-1] for i in range(3)]
        assert len(set(counts)) > 1, "test needs images with different token counts"
        assert (together - alone).abs().max() <= 1e-5


def test_dymu_matches_hand_written_forward():
    import naive

    model = tiny_vit(depth=2)
    x = X[:1]
    reduced = edgetok.apply(model, "dymu", threshold=[0.2, 0.1])

    def step(i, xx, size, metric, attn):
        (rx, rs), = naive.dymu(xx, metric, size, [0.2, 0.1][i], 1)
        return rx[None], rs[None]

    with torch.no_grad():
        ref, _, _ = manual.forward(model, x, step)
        assert (reduced(x) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("method,params", [
    ("tome", dict(r=2)), ("tome", dict(r=Linear(4, 0))), ("tome", dict(r="3,2,1")),
    ("drop", dict(keep_rate=0.5, layers=[0, 2])), ("drop", dict(r=[2, 2, 2], fuse_dropped=True)),
])
def test_token_counts_match_flops(method, params):
    model = tiny_vit()
    reduced = edgetok.apply(model, method, **params)
    assert edgetok.token_counts(reduced, X) == edgetok.flops(reduced, (3, 32, 32)).tokens
    assert edgetok.flops(reduced).total < edgetok.flops(model).total


def test_flops_adaptive_measured_on_inputs():
    model = tiny_vit()
    reduced = edgetok.apply(model, "dymu", threshold=0.0)
    bound = edgetok.flops(reduced)
    measured = edgetok.flops(reduced, inputs=X[:1])
    assert bound.notes and measured.measured
    assert measured.tokens == edgetok.token_counts(reduced, X[:1])
    assert measured.total < bound.total


def test_apply_leaves_the_input_model_alone(vit):
    before = copy.deepcopy(vit.state_dict())
    cls = type(vit)
    reduced = edgetok.apply(vit, "tome", r=2)
    assert type(vit) is cls and not hasattr(vit, "edgetok_plan")
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert reduced.state_dict().keys() == vit.state_dict().keys()
    assert isinstance(reduced, cls)


def test_methods_are_registered():
    assert {"tome", "drop", "dymu", "dtd"} <= set(edgetok.methods())


def test_schedule_too_large_names_layer_and_counts(vit):
    with pytest.raises(ScheduleError, match=r"layer 1: cannot merge r=6 tokens out of 11"):
        edgetok.apply(vit, "tome", r=6)
    with pytest.raises(ScheduleError, match="3 values but the model has 3 layers|has 2 values but the model has 3"):
        edgetok.apply(vit, "tome", r=[1, 1])
    with pytest.raises(ScheduleError, match="keep_rate"):
        edgetok.apply(vit, "drop", keep_rate=1.5)


def test_tome_clamp_merges_what_each_layer_can(vit):
    """ToMe's reference rule r = min(r, mergeable) per layer, asked for explicitly."""
    with pytest.raises(ScheduleError, match="clamp=True"):
        edgetok.apply(vit, "tome", r=6)
    clamped = edgetok.apply(vit, "tome", r=6, clamp=True)  # 17 tokens, 1 protected: 6, then 11 -> 5 left to merge
    assert clamped.edgetok_plan.params["r"] == [6, 5, 2]
    x = torch.randn(2, 3, 32, 32)
    assert edgetok.token_counts(clamped, x) == [17, 11, 6, 4] == edgetok.flops(clamped).tokens
    explicit = edgetok.apply(vit, "tome", r=[6, 5, 2])
    torch.testing.assert_close(clamped(x), explicit(x), rtol=0, atol=0)


def test_bad_inputs_are_clear_errors(vit):
    with pytest.raises(UnknownMethodError, match="unknown method 'nope'; registered methods: .*tome"):
        edgetok.apply(vit, "nope")
    with pytest.raises(EdgetokError, match="has no parameter 'k'; its parameters are: r, prop_attn"):
        edgetok.apply(vit, "tome", k=3)
    with pytest.raises(UnsupportedModelError, match="(?s)no adapter for torch.nn.modules.linear.Linear.*timm"):
        edgetok.apply(torch.nn.Linear(2, 2), "tome")
    reduced = edgetok.apply(vit, "tome", r=2)
    with pytest.raises(InputShapeError, match=r"expected images of shape \[batch, 3, 32, 32\]"):
        reduced(torch.randn(1, 3, 48, 48))
    with pytest.raises(EdgetokError, match="already reduced"):
        edgetok.apply(reduced, "tome", r=1)


def test_unsupported_timm_family_is_named():
    import timm

    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(UnsupportedModelError, match="Supported families"):
        edgetok.apply(model, "tome", r=1)
