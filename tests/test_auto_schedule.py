"""Latency-aware auto schedules with FAKE cost tables (timing is a benchmark, not a test):
the never-slower rule, goals, the cost model and the table cache."""
from __future__ import annotations

import pytest
import timm
import torch

from edgetok.errors import ScheduleError
from edgetok.tune import auto as A

DEPTH, TOKENS = 4, 17


def table(step_ms: float, fixed_ms: float = 1.0) -> A.CostTable:
    """Blocks cost 1 ms per token (MLP half of it); each reduction step costs step_ms."""
    grid = [4, 8, 12, 17]
    return A.CostTable({"backend": "fake", "batch": 1}, grid, [float(n) for n in grid], [n / 2 for n in grid],
                       [step_ms] * len(grid), fixed_ms)


def fid(r):  # earlier merges hurt much more, like real models
    return 1.0 - sum(ri * (DEPTH - i) ** 3 for i, ri in enumerate(r)) * 1e-4


def valid(r):
    return all(ri <= 4 for ri in r) and sum(r) < TOKENS - 2


def test_cost_model_layer_and_baseline():
    t = table(step_ms=0.5)
    assert t.predict([17] * (DEPTH + 1)) == pytest.approx(1 + 4 * 17)
    # attention at 12 tokens (6 ms), MLP at 8 (4 ms), plus the step
    assert t.layer(12, 8) == pytest.approx(6 + 4 + 0.5)
    assert t.layer(12, 12) == pytest.approx(12)


def test_returns_r0_and_says_so_when_steps_cost_more_than_they_save():
    res = A.search(table(step_ms=100.0), DEPTH, TOKENS, fid, valid, min_speedup=1.1)
    assert res.r == [0] * DEPTH and not res.reduced and not res.goal_met
    assert res.predicted_ms == res.baseline_ms and "keeping r=0" in res.reason


def test_never_slower_even_when_only_marginal_gains_exist():
    # a step that almost cancels the saving: anything found must still beat baseline by the margin, else r=0
    for step_ms in (0.0, 1.0, 1.4, 1.9, 3.0):
        res = A.search(table(step_ms), DEPTH, TOKENS, fid, valid, min_speedup=3.0, step=2)
        assert res.predicted_ms <= res.baseline_ms
        if res.reduced:
            assert res.predicted_ms < res.baseline_ms * (1 - A.MARGIN)
        else:
            assert res.r == [0] * DEPTH


def test_cheap_steps_meet_the_goal_and_prefer_late_layers():
    res = A.search(table(step_ms=0.1), DEPTH, TOKENS, fid, valid, min_speedup=1.2, step=2)
    assert res.reduced and res.goal_met and res.predicted_speedup >= 1.2
    # a merge at layer 0 saves ~7x the time of one at layer 3 but costs 64x the fidelity
    assert res.r[-1] >= res.r[0]
    budget = A.search(table(step_ms=0.1), DEPTH, TOKENS, fid, valid, budget_ms=60.0, step=2)
    assert budget.goal_met and budget.predicted_ms <= 60.0
    far = A.search(table(step_ms=0.1), DEPTH, TOKENS, fid, valid, min_speedup=10.0, step=2)
    assert far.reduced and not far.goal_met and "not reachable" in far.reason
    assert all(valid(s["r"]) for s in far.trace)


def test_goal_must_be_one_of_budget_or_speedup():
    with pytest.raises(ScheduleError, match="exactly one goal"):
        A.search(table(0.1), DEPTH, TOKENS, fid, valid)


def test_auto_schedule_on_a_model_with_a_fake_table_and_cache(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=DEPTH).eval()
    images = torch.randn(2, 3, 64, 64)
    slow = A.auto_schedule(vit, backend="torch-cpu", min_speedup=1.2, images=images, table=table(100.0))
    assert slow.r == [0] * DEPTH and not slow.reduced
    fast = A.auto_schedule(vit, backend="torch-cpu", min_speedup=1.2, images=images, table=table(0.1), step=2)
    assert fast.reduced and 0 < fast.fidelity < 1 and sum(fast.r) > 0
    t = table(0.1)
    from edgetok.patch import adapter_for

    t.key = A.cache_key(adapter_for(vit).info(vit), "torch-cpu", 1)
    path = A.save_table(t, tmp_path)
    assert path.is_file() and A.load_table(t.key, tmp_path) == t
    assert A.load_table(t.key | {"batch": 99}, tmp_path) is None


def test_calibration_falls_back_to_random_images_without_photo_packages(monkeypatch):
    import sys

    for name in ("skimage", "sklearn"):
        monkeypatch.setitem(sys.modules, name, None)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    from edgetok.patch import adapter_for

    images = A._calibration_images(adapter_for(model).info(model))
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()


def test_repair_lets_the_greedy_go_on_past_a_capped_layer():
    """Fidelity favours the last layer; once it holds most merges, a merge earlier leaves it
    fewer tokens than its r. Without a repair the search stops short of the goal; with
    ToMe's cap (edgetok.tune.auto._capper) it trades on and meets it."""
    from edgetok.patch import adapter_for
    from edgetok.reduce.tome import max_merges

    def tome_valid(r):
        n = TOKENS
        for ri in r:
            if ri > max_merges(n, 1):
                return False
            n -= ri
        return True

    def late_is_cheap(r):
        return 1.0 - sum(ri * 10 ** (DEPTH - 1 - i) for i, ri in enumerate(r)) * 1e-5

    t = table(step_ms=0.0, fixed_ms=0.0)
    stuck = A.search(t, DEPTH, TOKENS, late_is_cheap, tome_valid, min_speedup=1.5, step=1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=DEPTH)
    cap = A._capper("tome", adapter_for(model).info(model))
    assert cap([0, 0, 8, 8]) == [0, 0, 8, 4]  # 17 -> 9 tokens at layer 3: at most 4 merge there
    freed = A.search(t, DEPTH, TOKENS, late_is_cheap, tome_valid, min_speedup=1.5, step=1, repair=cap)
    assert not stuck.goal_met and freed.goal_met and tome_valid(freed.r)
    assert freed.predicted_speedup > stuck.predicted_speedup
    assert A._capper("drop", adapter_for(model).info(model)) is None  # no clamp: no repair


def _chosen(r=(4, 4, 0)):
    return A.AutoSchedule(r=list(r), predicted_ms=7.5, baseline_ms=10.0, fidelity=0.99, goal_met=True, reduced=True,
                          reason="speed-up 1.3x met")


def test_measurement_decides_not_the_prediction():
    # measured slower than unreduced: back to r=0
    slow = A.judge_measured(_chosen(), 0.95, "ort-cpu", min_speedup=1.3)
    assert slow.r == [0, 0, 0] and not slow.reduced and not slow.goal_met and "slower than unreduced" in slow.reason
    # faster, but under the goal the cost table promised: kept, and said
    short = A.judge_measured(_chosen(), 1.15, "ort-cpu", min_speedup=1.3)
    assert short.reduced and not short.goal_met and short.r == [4, 4, 0]
    assert "measured 1.15x on ort-cpu (predicted 1.33x): under the 1.3x goal" in short.reason
    over = A.judge_measured(_chosen(), 1.1, "ort-cpu", budget_ms=8.0)
    assert not over.goal_met and "over the 8 ms budget" in over.reason
    met = A.judge_measured(_chosen(), 1.35, "ort-cpu", min_speedup=1.3)
    assert met.goal_met and met.reason == "speed-up 1.3x met" and met.measured_speedup == 1.35
