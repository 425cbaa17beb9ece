"""DiffRate: per-layer prune and merge rates (from a rate file or a schedule).

Paper: Chen, Shao, Zhang, Li, Li, Luo, Qiao, Luo, "DiffRate: Differentiable
Compression Rate for Efficient Vision Transformers", ICCV 2023
(arXiv:2305.17997); reference code OpenGVLab/DiffRate.

Implemented: DiffRate's inference-time compression with given rates. In each
block, between attention and MLP: (1) prune: keep the tokens with the highest
class-token attention (averaged over heads; mean attention received for models
without a class token); (2) merge: of the survivors ranked by that importance,
the ``merge`` least important are merged into their most similar (cosine of
the attention keys averaged over heads) more important token by size-weighted
average, sizes adding up; the class token is never a merge target.
Proportional attention (log size added to the logits) as in the reference.
Rates come as per-layer counts (``prune``/``merge`` removed per layer), or from
a rate file (JSON or YAML) with either those keys or DiffRate's own
``prune_kept_num``/``merge_kept_num`` lists (tokens left after each step,
class token included).

Not implemented: the differentiable rate search itself (it trains on
ImageNet). Its stand-in is edgetok's latency-aware search
(edgetok.tune.auto): ``diffrate`` also takes ``r=`` (tokens removed per
layer, the knob that search tunes: ``auto_schedule(model, method="diffrate")``)
and splits each layer's r into merges (``merge_share``, rounded) and prunes.

Export: the prune is one edgetok::token_drop. The merge cannot be
edgetok::token_merge, whose sources/destinations are the fixed even/odd split,
while DiffRate's are set by importance; it is written in standard ops instead
(pairwise rank counts, TopK, GatherElements, ArgMax, a one-hot MatMul for the sums — no
scatter, per the rules of docs/ops.md). Departures: merged tokens keep original
order (the reference keeps importance order; blocks are permutation-equivariant),
merge targets tie to the lower index.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import ScheduleError
from .base import Reducer
from .registry import Plan, register_method
from .schedule import resolve_counts
from .scored import descending_rank


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def importance_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, importance: torch.Tensor,
                     r: int, protect_first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the ``r`` least important tokens into their most similar kept token.
    Returns (x [B,N-r,C], size [B,N-r,1]); kept tokens in original order."""
    b, n, c = x.shape
    keep = n - r
    ranked = importance
    if protect_first:
        ranked = importance.masked_fill(torch.arange(n, device=x.device) < protect_first, float("inf"))
    important = descending_rank(ranked) < keep
    # positions of the kept (ascending) and merged tokens by TopK on exact integer keys (no sort op in ONNX)
    pos = torch.arange(n, device=x.device, dtype=torch.float32)
    dst = torch.where(important, -pos, -pos - n).topk(keep, dim=-1).indices
    src = torch.where(important, -pos - n, -pos).topk(r, dim=-1).indices
    mn = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = _rows(mn, src) @ _rows(mn, dst).transpose(-1, -2)  # [B,r,keep]
    if protect_first:  # protected tokens are the first kept columns (dst is ascending)
        sim = sim.masked_fill(torch.arange(keep, device=x.device) < protect_first, float("-inf"))
    best = sim.argmax(dim=-1)
    assign = (best[..., None] == torch.arange(keep, device=x.device)).to(x.dtype)  # [B,r,keep]
    xs, ss = _rows(x, src) * _rows(size, src), _rows(size, src)
    sum_x = _rows(x, dst) * _rows(size, dst) + assign.transpose(1, 2) @ xs
    sum_s = _rows(size, dst) + assign.transpose(1, 2) @ ss
    return sum_x / sum_s, sum_s


class DiffRateStep(Reducer):
    """One DiffRate block step: prune ``prune`` tokens, then merge ``merge`` tokens."""

    def __init__(self, prune: int, merge: int, protect_first: int):
        super().__init__()
        self.prune, self.merge, self.protect_first = int(prune), int(merge), int(protect_first)

    def extra_repr(self) -> str:
        return f"prune={self.prune}, merge={self.merge}, protect_first={self.protect_first}"

    def tokens_after(self, n: int, where: str = "") -> int:
        left = n - self.prune - self.merge
        if self.prune < 0 or self.merge < 0 or left < max(self.protect_first, 1) or (
            self.merge and left <= self.protect_first
        ):
            raise ScheduleError(
                f"{where}diffrate cannot prune {self.prune} and merge {self.merge} of {n} tokens "
                f"({self.protect_first} protected, and a merge needs an unprotected target); lower the rates"
            )
        return left

    def reduction_flops(self, n: int, dim: int) -> int:
        k = n - self.prune
        return 2 * n * dim + (2 * self.merge * (k - self.merge) * dim + 2 * self.merge * (k - self.merge) * dim
                              if self.merge else 0)

    def forward(self, x, size, ctx):
        if size is None:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
        score = ctx.cls_attn if self.protect_first >= 1 else ctx.mean_attn
        metric = ctx.metric
        if self.prune:
            n = x.shape[1]
            x, idx = torch.ops.edgetok.token_drop(x, score, n - self.prune, self.protect_first, 0)
            size = size.gather(1, idx[..., None])
            score = score.gather(1, idx)
            metric = metric.gather(1, idx[..., None].expand(-1, -1, metric.shape[-1]))
        if self.merge:
            x, size = importance_merge(x, metric, size, score, self.merge, self.protect_first)
        return x, size


def _read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"diffrate rate file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # lazy: only rate files need it

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ScheduleError(f"diffrate rate file {path} must hold a mapping with prune/merge lists")
    return data


def load_rates(source, depth: int, tokens: int) -> tuple[list[int], list[int]]:
    """Per-layer (prune, merge) counts from a rate file path or mapping: either
    ``prune``/``merge`` (removed per layer) or DiffRate's ``prune_kept_num``/
    ``merge_kept_num`` (tokens left after each step, class token included)."""
    data = source if isinstance(source, dict) else _read(source)
    if "prune_kept_num" in data and "merge_kept_num" in data:
        pk, mk = list(data["prune_kept_num"]), list(data["merge_kept_num"])
        if len(pk) != depth or len(mk) != depth:
            raise ScheduleError(
                f"diffrate rates have {len(pk)}/{len(mk)} kept counts but the model has {depth} layers"
            )
        prune, merge, n = [], [], tokens
        for i, (p, m) in enumerate(zip(pk, mk)):
            if not n >= p >= m:
                raise ScheduleError(
                    f"diffrate layer {i}: kept counts must not grow (tokens {n}, prune_kept {p}, merge_kept {m})"
                )
            prune.append(n - int(p))
            merge.append(int(p) - int(m))
            n = int(m)
        return prune, merge
    if "prune" in data and "merge" in data:
        return resolve_counts(data["prune"], depth, "prune"), resolve_counts(data["merge"], depth, "merge")
    raise ScheduleError(
        "diffrate rates need 'prune' and 'merge' (counts removed per layer) or DiffRate's "
        f"'prune_kept_num' and 'merge_kept_num'; got keys {sorted(data)}"
    )


@register_method("diffrate", "DiffRate: per-layer prune (class attention) + merge (into important tokens) rates")
def build_diffrate(depth: int, tokens: int, protect: int, prune=None, merge=None, rate_file=None, r=None,
                   merge_share: float = 0.5, prop_attn: bool = True, protect_first: Optional[int] = None) -> Plan:
    """Rates as ``prune=`` and ``merge=`` (tokens removed per layer: a number, one per
    layer or 'linear:A:B'), ``rate_file=`` (JSON/YAML, see load_rates), or ``r=``
    removed per layer, ``merge_share`` of it merged (what edgetok.tune.auto searches)."""
    p = protect if protect_first is None else int(protect_first)
    given = [name for name, v in (("rate_file", rate_file), ("r", r)) if v is not None]
    if len(given) + (prune is not None or merge is not None) > 1:
        raise ScheduleError("diffrate takes one of rate_file=, r= or prune=/merge=")
    if not 0.0 <= merge_share <= 1.0:
        raise ScheduleError(f"diffrate merge_share={merge_share} must be in [0, 1]")
    if rate_file is not None:
        pr, mr = load_rates(rate_file, depth, tokens)
    elif r is not None:
        rs = resolve_counts(r, depth, "r")
        mr = [int(round(ri * merge_share)) for ri in rs]
        pr = [ri - mi for ri, mi in zip(rs, mr)]
    else:
        if prune is None and merge is None:
            raise ScheduleError("diffrate needs rates: prune= and/or merge= (per layer), or rate_file=")
        pr = resolve_counts(prune or 0, depth, "prune")
        mr = resolve_counts(merge or 0, depth, "merge")
    reducers, n = [], tokens
    for i in range(depth):
        if pr[i] == 0 and mr[i] == 0:
            reducers.append(None)
            continue
        step = DiffRateStep(pr[i], mr[i], p)
        n = step.tokens_after(n, f"layer {i}: ")
        reducers.append(step)
    params = {"prune": pr, "merge": mr, "prop_attn": prop_attn, "protect_first": p}
    if rate_file is not None and not isinstance(rate_file, dict):
        params["rate_file"] = str(rate_file)
    return Plan("diffrate", params, reducers, prop_attn=prop_attn)
