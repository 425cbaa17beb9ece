"""CLCA: Cross-Layer Cache Aggregation, a plug-in on top of any token reduction.

Paper: Rios, Yuanda, Ghanz, Yu, Lai, Hu, "Cross-Layer Cache Aggregation for
Token Reduction in Ultra-Fine-Grained Image Recognition", ICASSP 2025
(arXiv:2501.00243); official code github.com/arkel23/CLCA (models/vit.py,
evit.py, tome.py). Only the abstract and summaries of the paper were reachable
from this machine, not its full text: the parts below follow the abstract and
what the official code does (read for facts, no code taken).

Use::

    edgetok.apply(vit, "clca", base="drop", keep_rate=0.25, layers=[1, 3])
    edgetok.apply(vit, "clca", base="tome", r=[0, 16, 0, 8, 0, 0])
    edgetok.apply(edgetok.apply(vit, "divprune", keep_rate=0.5), "clca")  # on an already reduced model

``base`` is any ViT block method (drop, tome, divprune, hired, zero_tprune,
diffrate, slim, mustdrop, dymu, ... or "none"); ``keep_rate``/``r``/``layers``
and ``base_params`` go to it unchanged, so the base reduction is exactly the
one ``edgetok.apply(vit, base, ...)`` gives. CLCA adds new parameters (carrier
tokens and a new classification head) that must be trained:
``edgetok finetune`` (edgetok/commands/finetune.py) does that.

Implemented, both parts of the paper:

- Cross-Layer Cache (CLC). ``carriers`` learnable tokens (official
  ``num_clr``; initialised from the embedded class token, as the official
  ``add_clr`` copies the class token) ride at the end of the sequence. After
  every block before the last recovery layer the cache takes a snapshot of the
  per-layer summaries: the carrier tokens' states and, with ``gap=True``, the
  mean of the image tokens (official ``clc_include_gap``). After each recovery
  layer (default: every block that has a reduction step, the official
  ``recovery_layers = reduction_loc``) the snapshots cached since the previous
  recovery are appended to the sequence and the cache is emptied, so the later
  blocks attend to what earlier layers held before tokens were removed.
- Cross-Layer Aggregation head (CLA; official ``ifa_head`` with
  ``ifa_dws_conv_groups=2``). The class token after every reduction or
  recovery block and after the last block, stacked [B, C, L], goes through
  BatchNorm, a depthwise 1-D convolution over the layer axis (kernel L,
  ``width`` filters per channel), BatchNorm, GELU and a linear layer to the
  classes. It replaces the model's final norm and classifier.

Departures (deliberate):

- Cache tokens are never reduced. The base reduction step sees only the
  prefix and image tokens (the cache tokens at the end of the sequence are set
  aside and appended back after it; its scores come from their q/k only), so
  its per-layer counts are exactly those of the base method alone, and the
  cache adds a static, known number of tokens. In the official code the
  carriers and recovered tokens are ordinary tokens the next reduction may
  drop or merge, and its keep counts include them.
- The snapshot is of the live carrier tokens (they keep their slot). The
  official code caches "the last num_clr tokens", which after the first
  recovery are the most recently recovered copies rather than the carriers.
- The GAP summary is weighted by token size (ToMe's merged tokens count once
  per patch) and excludes the cache tokens; models without a class token use
  that weighted mean as the per-layer summary the CLA head aggregates.
- ``keep_classifier=True`` (not in the paper, off by default) keeps the
  model's own final norm + classifier on the last tokens and adds the CLA
  head's logits, its last layer starting at zero, so fine-tuning starts from
  the reduced model's predictions instead of a fresh head.
- The cache is never recovered after the last block (no block would read it).
- Not implemented: the paper's training recipe (datasets, resolutions,
  schedules), and the official options ``clc_recover_at_last``,
  ``clc_pool_cls``, ``clc_pool_clr``, the non-convolutional IFA head variant.

This module holds the token math (pure torch, no model knowledge): the step
wrapper that sets the cache aside during a reduction, the snapshot/recovery
functions, the CLA head, the static token schedule and the exact FLOPs count.
The model side (carriers, the block loop, the head in the model) is
edgetok/patch/clca.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ScheduleError
from .base import AttentionContext, Reducer

EPS = 1e-6


# -- the cache -----------------------------------------------------------------------------------
def weighted_mean(x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over tokens [B,N,C] -> [B,C], each weighted by its size (0 on padding)."""
    if size is None:
        return x.mean(1)
    return (x * size).sum(1) / size.sum(1).clamp_min(EPS)


def snapshot(x: torch.Tensor, size: Optional[torch.Tensor], main: int, prefix: int, carriers: int,
             gap: bool) -> torch.Tensor:
    """The per-layer summaries the cache keeps [B, gap + carriers, C]: the mean of the
    image tokens x[:, prefix:main] (``gap``) and the carrier tokens x[:, main:main+carriers]."""
    parts = []
    if gap:
        parts.append(weighted_mean(x[:, prefix:main], None if size is None else size[:, prefix:main])[:, None])
    if carriers:
        parts.append(x[:, main:main + carriers])
    return torch.cat(parts, dim=1)


def recover(x: torch.Tensor, size: Optional[torch.Tensor], cache: Sequence[torch.Tensor]):
    """Append the cached snapshots to the sequence; they stand for one patch each."""
    if not cache:
        return x, size
    cached = torch.cat(list(cache), dim=1)
    x = torch.cat([x, cached], dim=1)
    if size is not None:
        size = torch.cat([size, size.new_ones(size.shape[0], cached.shape[1], 1)], dim=1)
    return x, size


class CacheStep(Reducer):
    """A block's reduction step with the cache tokens set aside: the last ``trailing``
    tokens (carriers + recovered snapshots) skip ``inner`` and are appended back.
    ``recovered`` is how many snapshots come back after this block (the model's loop
    appends them); ``tokens_after`` counts them so generic token accounting sees them."""

    def __init__(self, inner: Optional[Reducer], trailing: int, recovered: int = 0):
        super().__init__()
        self.inner, self.trailing, self.recovered = inner, int(trailing), int(recovered)
        self.adaptive = bool(getattr(inner, "adaptive", False))

    def extra_repr(self) -> str:
        return f"trailing={self.trailing}, recovered={self.recovered}"

    def step_tokens(self, n: int, where: str = "") -> int:
        """Tokens after the reduction step itself (before the recovery)."""
        if self.inner is None:
            return n
        return self.inner.tokens_after(n - self.trailing, where) + self.trailing

    def tokens_after(self, n: int, where: str = "") -> int:
        return self.step_tokens(n, where) + self.recovered

    def reduction_flops(self, n: int, dim: int) -> int:
        return self.inner.reduction_flops(n - self.trailing, dim) if self.inner is not None else 0

    def forward(self, x, size, ctx: AttentionContext):
        if self.inner is None:
            return x, size
        if not self.trailing:
            return self.inner(x, size, ctx)
        n = x.shape[1] - self.trailing
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        bias = None if ctx.bias is None else ctx.bias[..., :n]
        sub = AttentionContext(ctx.q[:, :, :n], ctx.k[:, :, :n], bias, ctx.scale)
        out, out_size = self.inner(x[:, :n], size[:, :n], sub)
        return torch.cat([out, x[:, n:]], dim=1), torch.cat([out_size, size[:, n:]], dim=1)


# -- the cross-layer aggregation head ----------------------------------------------------------
class CLAHead(nn.Module):
    """Cross-layer aggregation classifier: per-layer summaries [B, L, C] -> logits [B, K].

    BatchNorm over channels, a depthwise convolution over the L layers (``width``
    filters per channel, kernel L: one learned weighting of the layers per
    channel and filter), BatchNorm, GELU, linear classifier. ``zero_init`` starts
    the classifier at zero (used when the head is added to an existing one).
    """

    def __init__(self, dim: int, layers: int, classes: int, width: int = 2, zero_init: bool = False):
        super().__init__()
        if layers < 1 or width < 1 or classes < 1:
            raise ScheduleError(f"CLA head needs layers, width and classes >= 1 (got {layers}, {width}, {classes})")
        self.dim, self.layers, self.width = dim, layers, width
        self.norm_in = nn.BatchNorm1d(dim)
        self.mix = nn.Conv1d(dim, dim * width, kernel_size=layers, groups=dim)
        self.norm_mid = nn.BatchNorm1d(dim * width)
        self.fc = nn.Linear(dim * width, classes)
        if zero_init:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 3 or feats.shape[1] != self.layers or feats.shape[2] != self.dim:
            raise ScheduleError(f"CLA head expects [batch, {self.layers}, {self.dim}] features, got {list(feats.shape)}")
        h = self.mix(self.norm_in(feats.transpose(1, 2)))  # [B, C*width, 1]
        return self.fc(F.gelu(self.norm_mid(h))[..., 0])

    def flops(self, classes: Optional[int] = None) -> int:
        k = self.fc.out_features if classes is None else classes
        c, w, l = self.dim, self.width, self.layers
        return 2 * c * l + 2 * c * w * l + 4 * c * w + 2 * c * w * k


# -- the static token schedule -------------------------------------------------------------------
@dataclass
class Schedule:
    """Token counts of a CLCA model per block (static; adaptive bases give upper bounds).

    ``tokens_in[i]``: tokens entering block i (carriers and recovered snapshots included);
    ``step_out[i]``: after its reduction step (what its MLP runs on); ``recovered[i]``:
    snapshots appended after block i; ``trailing[i]``: cache tokens at the end of the
    sequence during block i; ``summary_layers``: blocks whose output feeds the CLA head.
    """

    tokens_in: list[int]
    step_out: list[int]
    recovered: list[int]
    trailing: list[int]
    recover_at: list[int]
    summary_layers: list[int]
    per_snapshot: int
    notes: list[str] = field(default_factory=list)

    @property
    def final(self) -> int:
        return self.step_out[-1] + self.recovered[-1]

    def to_dict(self) -> dict:
        return {"tokens_in": self.tokens_in, "step_out": self.step_out, "recovered": self.recovered,
                "trailing": self.trailing, "recover_at": self.recover_at, "summary_layers": self.summary_layers,
                "final": self.final}


def schedule(depth: int, tokens: int, steps: Sequence[Optional[Reducer]], carriers: int = 1, gap: bool = False,
             recover_at: Optional[Sequence[int]] = None) -> Schedule:
    """Where the cache snapshots go and how many tokens each block sees.

    ``tokens``: tokens out of the embedding (prefix + image); ``steps``: the base
    method's reducer (or None) per block; ``recover_at``: blocks after which the cache
    is recovered (default: the blocks with a reduction step; never after the last block,
    where nothing would read it)."""
    if carriers < 0:
        raise ScheduleError(f"carriers={carriers} must be >= 0")
    if len(steps) != depth:
        raise ScheduleError(f"{len(steps)} reduction steps for a model with {depth} blocks")
    reducing = [i for i, s in enumerate(steps) if s is not None]
    recover = sorted(set(reducing if recover_at is None else (int(i) for i in recover_at)))
    bad = [i for i in recover if not 0 <= i < depth]
    if bad:
        raise ScheduleError(f"recover_at {bad} is outside the model's {depth} blocks")
    recover = [i for i in recover if i < depth - 1]  # after the last block no block could attend to the cache
    per = carriers + int(gap)
    notes = []
    if per and not recover:
        raise ScheduleError("the cross-layer cache has no recovery layer: the base method reduces nowhere; "
                            "give recover_at=[...] (or carriers=0, gap=False for the CLA head alone)")
    if not per:
        notes.append("no cross-layer cache (carriers=0, gap=False): CLA head only")
    heads = sorted(set(reducing) | set(recover) | {depth - 1})
    tokens_in, step_out, recovered, trailing = [], [], [], []
    n, tail, since = tokens + carriers, carriers, 0
    last = recover[-1] if recover and per else -1
    for i in range(depth):
        tokens_in.append(n)
        trailing.append(tail)
        step = CacheStep(steps[i], tail)
        n = step.step_tokens(n, f"layer {i}: ")
        step_out.append(n)
        back = 0
        if per and i in recover:
            back = since * per
            since = 0
        if per and i < last:
            since += 1
        recovered.append(back)
        n, tail = n + back, tail + back
    return Schedule(tokens_in, step_out, recovered, trailing, recover, heads, per, notes)


def count_flops(info, sched: Schedule, steps: Sequence[Optional[Reducer]], head: Optional[CLAHead] = None):
    """Exact FLOPs report (batch 1) of a CLCA model, in edgetok.reduce.flops' terms: each
    block's attention on ``tokens_in``, its MLP on ``step_out`` (recovered snapshots join
    after the MLP), the base steps' own cost; the CLA head's FLOPs go into the notes
    (heads are left out of totals, as for every method)."""
    from . import flops as _flops

    layers = []
    for i, red in enumerate(steps):
        lf = _flops.block_flops(info, sched.tokens_in[i], sched.step_out[i],
                                CacheStep(red, sched.trailing[i]) if red is not None else None)
        lf.layer = i
        layers.append(lf)
    gh, gw = info.grid
    embed = 2 * gh * gw * info.in_chans * info.patch_size ** 2 * info.dim
    report = _flops.FlopsReport(layers, embed)
    report.notes.append(f"CLCA: {sum(sched.recovered)} cache tokens recovered after blocks {sched.recover_at}; "
                        f"final tokens {sched.final}")
    if head is not None:
        report.notes.append(f"CLA head: {head.flops()} FLOPs (not in the total; heads are left out)")
    return report
