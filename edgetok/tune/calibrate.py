"""Calibration: DyMU's thresholds found from a batch of images (arXiv:2504.17040; the
method is edgetok/reduce/dymu.py): run ToMe with the r to be matched and record, per
layer, the similarity of each image's r-th best match."""
from __future__ import annotations

import torch

from ..patch import adapter_for
from ..patch.api import apply
from ..reduce.base import Reducer
from ..reduce.dymu import match_scores


class _ThresholdRecorder(Reducer):
    """Calibration step: records each image's r-th best match score, then merges r."""

    def __init__(self, merge: Reducer, record: list):
        super().__init__()
        self.merge, self.record = merge, record

    def forward(self, x, size, ctx):
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        best = match_scores(ctx.metric, size, self.merge.protect_first)
        self.record.append(best.sort(dim=-1, descending=True).values[:, self.merge.r - 1])
        return self.merge(x, size, ctx)


@torch.no_grad()
def calibrate(model, images: torch.Tensor, r=8, protect_first=None, clamp: bool = False) -> list[float]:
    """Per-layer thresholds that merge ``r`` tokens per layer on average over
    ``images`` (DyMU's batch-statistics threshold finding). Layers with r=0 get
    threshold 1.0 (never merge). ``clamp`` as in ToMe: r capped at what each layer can merge."""
    tome = apply(model, "tome", r=r, protect_first=protect_first, clamp=clamp)
    recorded: list = []
    blocks = adapter_for(tome).blocks(tome)
    rs = tome.edgetok_plan.params["r"]
    for blk in blocks:
        if getattr(blk, "token_reducer", None) is not None:
            blk.token_reducer = _ThresholdRecorder(blk.token_reducer, recorded)
    tome.eval()(images)
    it = iter(recorded)
    return [float(next(it).mean()) if ri else 1.0 for ri in rs]
