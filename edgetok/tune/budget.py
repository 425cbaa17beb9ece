"""``edgetok tune``: the fastest per-layer schedule that keeps a budget on the user's own images.

Papers: the search trades measured cost for fidelity layer by layer as DiffRate does
(Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers",
ICCV 2023, arXiv:2305.17997: per-layer prune/merge rates under a FLOPs constraint, prune then
merge); the reductions are ToMe's bipartite merging (Bolya et al., "Token Merging: Your ViT but
Faster", ICLR 2023, arXiv:2210.09461) or edgetok's DiffRate prune-then-merge step, any method
whose schedule is a per-layer ``r``.

What is implemented: the calibration images are split in two halves (seeded shuffle): the
search scores candidates on one half, the winner is verified on the other. Four budgets:

- ``min_speedup`` / ``budget_ms`` (speed): greedy, from r=0, add ``step`` removals (doubled until
  the move is predicted faster: a layer's first removals must pay for its reduction step) to the
  one layer that buys the most predicted latency per unit of lost fidelity, until the goal is
  predicted met (edgetok.tune.auto.search's rule);
- ``min_cosine`` (mean and optional worst-image feature cosine to the unreduced model) and
  ``max_top1_drop`` (points of top-1 on labelled images): the same greedy, but a candidate
  must keep the budget on the search half; it stops when no step keeps it. The winner is
  checked on the verification half; where it misses there, the search steps back along its
  path to the last schedule that keeps the budget on both halves.

Predicted latency comes from a cost table measured on the target backend
(edgetok.tune.auto.measure_table: per token count and batch). The winner's speed is then
measured (interleaved with the unreduced model, edgetok.validate.timing); more than 10 % off
the prediction and the report says so, the table is measured again once and the search
repeated with it. A schedule measured slower than unreduced, or a budget no schedule meets,
gives r=0 everywhere and the reason.

Departures from DiffRate: no gradients and no training (a greedy over measured costs and
measured agreement); the constraint is latency measured on the target, not FLOPs; every
budget is guided by the mean feature cosine (smooth, unlike top-1; ``feature='cls'`` for a
classifier that reads its class token), top-1 budgets are checked in top-1 points.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import EdgetokError, ScheduleError
from .auto import MARGIN, CostTable, counts_for

TOLERANCE = 0.10  # a measured speed-up further than this from the prediction is reported and re-measured


class TuneError(EdgetokError, ValueError):
    """A budget, image set or schedule file ``edgetok tune`` cannot use."""


# -- budgets ---------------------------------------------------------------------------------------
@dataclass
class Budget:
    """Exactly one of: a minimum speed-up, a latency in ms, a cosine floor (mean[, worst]), a top-1 drop."""

    min_speedup: Optional[float] = None
    budget_ms: Optional[float] = None
    min_cosine: Optional[float] = None
    worst_cosine: Optional[float] = None
    max_top1_drop: Optional[float] = None

    @property
    def speed(self) -> bool:
        return self.min_speedup is not None or self.budget_ms is not None

    def goal_ms(self, baseline_ms: float) -> Optional[float]:
        if self.budget_ms is not None:
            return self.budget_ms
        return baseline_ms / self.min_speedup if self.min_speedup is not None else None

    def keeps(self, score: dict) -> bool:
        """Whether a fidelity score (see Scorer.score) keeps a fidelity budget (speed budgets: always)."""
        if self.min_cosine is not None and score["cos_mean"] < self.min_cosine:
            return False
        if self.worst_cosine is not None and score["cos_min"] < self.worst_cosine:
            return False
        return self.max_top1_drop is None or score["top1_drop"] <= self.max_top1_drop + 1e-9

    def guide(self, score: dict) -> float:
        """The smooth quantity the greedy trades for latency (1 = the unreduced model): the mean
        feature cosine, for every budget (top-1 and the true class's probability are too noisy on a
        few hundred images to rank single steps; top-1 is the constraint, not the guide)."""
        return score["cos_mean"]

    def describe(self) -> str:
        if self.min_speedup is not None:
            return f"speed-up >= {self.min_speedup:g}x"
        if self.budget_ms is not None:
            return f"latency <= {self.budget_ms:g} ms"
        if self.min_cosine is not None:
            worst = f", worst image >= {self.worst_cosine}" if self.worst_cosine is not None else ""
            return f"mean feature cosine >= {self.min_cosine}{worst}"
        return f"top-1 drop <= {self.max_top1_drop:g} pt"


def make_budget(min_speedup=None, budget_ms=None, min_cosine=None, max_top1_drop=None,
                labels: bool = False) -> Budget:
    """The one budget given (``min_cosine``: 'MEAN' or 'MEAN,WORST'); one-line errors otherwise."""
    given = [n for n, v in (("--min-speedup", min_speedup), ("--budget-ms", budget_ms),
                            ("--min-cosine", min_cosine), ("--max-top1-drop", max_top1_drop)) if v is not None]
    if len(given) != 1:
        raise TuneError(f"give exactly one budget ({'got ' + ' and '.join(given) if given else 'none given'}): "
                        "--min-speedup X, --budget-ms Y, --min-cosine MEAN[,WORST] or --max-top1-drop PTS")
    if min_speedup is not None and not float(min_speedup) > 1.0:
        raise TuneError(f"--min-speedup {min_speedup} must be above 1 (1.3 = 30 % faster than unreduced)")
    if budget_ms is not None and not float(budget_ms) > 0:
        raise TuneError(f"--budget-ms {budget_ms} must be a positive latency in milliseconds")
    if max_top1_drop is not None:
        if not float(max_top1_drop) >= 0:
            raise TuneError(f"--max-top1-drop {max_top1_drop} must be >= 0 (top-1 points, 0.5 = half a point)")
        if not labels:
            raise TuneError("--max-top1-drop needs labels: give an .npz with an integer 'labels' array next to "
                            "'images' (a folder has none), or use --min-cosine")
    mean, worst = _cosines(min_cosine) if min_cosine is not None else (None, None)
    return Budget(None if min_speedup is None else float(min_speedup), None if budget_ms is None else float(budget_ms),
                  mean, worst, None if max_top1_drop is None else float(max_top1_drop))


def _cosines(text) -> tuple[float, Optional[float]]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(-1.0 <= v <= 1.0 for v in values):
        raise TuneError(f"--min-cosine {text!r}: give MEAN or MEAN,WORST, cosines in [-1, 1] (e.g. 0.995,0.95)")
    return values[0], (values[1] if len(values) == 2 else None)


# -- fidelity --------------------------------------------------------------------------------------
class Scorer:
    """The unreduced model's outputs on a set of images, and how far a reduced model moves from
    them: feature cosine per image (mean, worst) and, with labels, top-1 and the true class's
    mean probability. ``feature``: 'pooled' (size-weighted mean of the final-norm patch tokens,
    as edgetok.validate.fidelity) or 'cls' (the class token)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 feature: str = "pooled", batch: int = 128):
        if feature not in ("pooled", "cls"):
            raise TuneError(f"feature {feature!r}: use 'pooled' or 'cls'")
        self.images, self.labels, self.feature, self.batch = images, labels, feature, batch
        self.ref, logits = self.outputs(model)
        self.top1 = self._top1(logits) if labels is not None else None

    @torch.no_grad()
    def outputs(self, model: nn.Module):
        """(features [N,C], logits [N,K] or None) in one pass over the blocks."""
        from ..patch import adapter_for
        from ..patch.base import run_blocks, weighted_mean
        from ..validate.fidelity import final_norm

        adapter = adapter_for(model)
        prefix, norm = adapter.info(model).num_prefix, final_norm(model)
        feats, logits = [], []
        for chunk in self.images.split(self.batch):
            tokens, size = run_blocks(adapter, model, adapter.embed(model, chunk))
            tokens = norm(tokens)
            pooled = weighted_mean(tokens[:, prefix:], None if size is None else size[:, prefix:])
            feats.append(tokens[:, 0] if self.feature == "cls" and prefix else pooled)
            if self.labels is not None:
                logits.append(_logits(model, tokens, chunk))
        return torch.cat(feats), (torch.cat(logits) if logits else None)

    def _top1(self, logits) -> float:
        return float((logits.argmax(-1) == self.labels).double().mean() * 100)

    def score(self, model: nn.Module) -> dict:
        from ..validate.fidelity import cosine

        feats, logits = self.outputs(model)
        cos = cosine(self.ref, feats)
        out = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "images": int(len(cos))}
        if logits is not None:
            top1 = self._top1(logits)
            p_true = logits.double().softmax(-1).gather(-1, self.labels[:, None]).mean()
            out |= {"top1": top1, "top1_base": self.top1, "top1_drop": self.top1 - top1, "p_true": float(p_true)}
        return out


def _logits(model: nn.Module, normed: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """Class logits from the final-norm tokens (timm's forward_head), else the model's own output."""
    head = getattr(model, "forward_head", None)
    out = head(normed) if callable(head) else model(chunk)
    out = getattr(out, "logits", out)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise TuneError(f"{type(model).__name__} does not return class logits [N, classes], so a top-1 budget "
                        "cannot be measured; use --min-cosine")
    return out


# -- the search ------------------------------------------------------------------------------------
@dataclass
class Point:
    """One schedule: its per-layer r, predicted latency (ms) and fidelity on the search half."""

    method: str
    r: list[int]
    predicted_ms: float
    score: dict

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    """What the search needs of one method: its cost table and a way to build and check a schedule."""

    method: str
    table: CostTable
    build: Callable[[list[int]], nn.Module]  # r -> reduced model
    valid: Callable[[list[int]], bool]
    repair: Optional[Callable[[list[int]], Optional[list[int]]]] = None


def greedy(cand: Candidate, depth: int, tokens: int, scorer, budget: Budget, step: int) -> list[Point]:
    """The greedy path (see the module docstring): r=0 first, each point one step further."""
    table = cand.table
    base = table.predict(counts_for([0] * depth, tokens))
    goal = budget.goal_ms(base)
    path = [Point(cand.method, [0] * depth, base, scorer.unreduced())]
    while goal is None or path[-1].predicted_ms > goal:
        cur = path[-1]
        best = None
        for r in _moves(cand, cur.r, step, tokens):  # each predicted faster than cur
            lat = table.predict(counts_for(r, tokens))
            score = scorer(cand.method, r, cand.build)
            if not budget.speed and not budget.keeps(score):
                continue
            gain = (cur.predicted_ms - lat) / max(budget.guide(cur.score) - budget.guide(score), 1e-9)
            if best is None or gain > best[0]:
                best = (gain, Point(cand.method, r, lat, score))
        if best is None:
            break
        path.append(best[1])
    return path


def _moves(cand: Candidate, r: list[int], step: int, tokens: int):
    """One move per layer: ``step`` more removals there, doubled until the cost table predicts the
    move faster than ``r`` (a layer's first removals must pay for its reduction step, which a
    single small step may not: without this the greedy stalls at r=0 where uniform r=8 pays)."""
    seen, now = set(), cand.table.predict(counts_for(r, tokens))
    for i in range(len(r)):
        size = step
        while size <= tokens:
            nxt = list(r)
            nxt[i] += size
            if not cand.valid(nxt):
                nxt = cand.repair(nxt) if cand.repair is not None else None
                if nxt is None or nxt == r or not cand.valid(nxt):
                    break
            if cand.table.predict(counts_for(nxt, tokens)) < now:
                if tuple(nxt) not in seen:
                    seen.add(tuple(nxt))
                    yield nxt
                break
            size *= 2


class CachedScores:
    """Scores of each (method, r) on one image half, computed once."""

    def __init__(self, scorer: Scorer, base_model: nn.Module):
        self.scorer, self.cache = scorer, {}
        self.base = scorer.score(base_model)

    def unreduced(self) -> dict:
        return self.base

    def __call__(self, method: str, r: Sequence[int], build) -> dict:
        key = (method, tuple(r))
        if not any(r):
            return self.base
        if key not in self.cache:
            self.cache[key] = self.scorer.score(build(list(r)))
        return self.cache[key]


def pick(paths: list[list[Point]], budget: Budget) -> Point:
    """The winner over every method's path: speed budgets, the best guided fidelity among points
    predicted to meet the goal (else the fastest); fidelity budgets, the fastest point."""
    ends = [p[-1] for p in paths]
    if budget.speed:
        base = paths[0][0].predicted_ms
        met = [p for p in ends if p.predicted_ms <= budget.goal_ms(base)]
        if met:
            return max(met, key=lambda p: (budget.guide(p.score), -p.predicted_ms))
    return min(ends, key=lambda p: (p.predicted_ms, -budget.guide(p.score)))


# -- verification, measurement, the whole run ------------------------------------------------------
@dataclass
class Outcome:
    """The chosen schedule, why, and what it measured."""

    point: Point
    path: list[Point]
    baseline_ms: float
    reduced: bool
    goal_met: bool
    reason: str
    verify: dict = field(default_factory=dict)
    measured_speedup: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_speedup(self) -> float:
        return self.baseline_ms / self.point.predicted_ms


def split(images: torch.Tensor, labels: Optional[torch.Tensor], seed: int = 0, search_limit: Optional[int] = None):
    """Two halves of a seeded shuffle: (search images, labels), (verification images, labels);
    ``search_limit`` keeps the first ``search_limit`` of the search half (a faster search)."""
    n = int(images.shape[0])
    if n < 2:
        raise TuneError(f"{n} calibration image(s): give at least 2 (one half searches, the other verifies)")
    if labels is not None and len(labels) != n:
        raise TuneError(f"{n} images but {len(labels)} labels: give one integer label per image")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    s, v = order[: n // 2], order[n // 2:]
    if search_limit:
        s = s[: max(1, int(search_limit))]
    pick_ = (lambda idx: labels[idx]) if labels is not None else (lambda idx: None)
    return (images[s], pick_(s)), (images[v], pick_(v))


class Tuner:
    """One ``edgetok tune`` run on a model (see the module docstring and ``tune``)."""

    def __init__(self, model, budget: Budget, search, verify, backend: str, batch: int, methods: Sequence[str],
                 params: Optional[dict] = None, step: Optional[int] = None, repeats: int = 10, cache=None,
                 speed_fn: Optional[Callable] = None):
        from ..patch import adapter_for

        self.model, self.budget, self.backend, self.batch = model, budget, backend, batch
        self.methods, self.params, self.repeats, self.cache = list(methods), dict(params or {}), repeats, cache
        self.info = adapter_for(model).info(model)
        self.step = step or max(1, self.info.tokens // 32)
        self.search, self.verify = search, verify
        self.speed_fn = speed_fn or self._measure_speed

    def candidate(self, method: str, table: CostTable) -> Candidate:
        from ..patch.api import apply
        from ..reduce.registry import get_method
        from .auto import _capper

        info, params, spec = self.info, self.params, get_method(method)

        def valid(r):
            try:
                spec.build(info.depth, info.tokens, info.num_prefix, r=list(r), **params)
                return True
            except ScheduleError:
                return False

        return Candidate(method, table, lambda r: apply(self.model, method, r=list(r), **params), valid,
                         _capper(method, info))

    def tables(self, refresh: bool = False, given: Optional[dict] = None) -> dict:
        from .auto import measure_table

        given = given or {}
        return {m: given[m] if m in given and not refresh else
                measure_table(self.model, self.backend, self.batch, self.repeats, method=m, cache=self.cache,
                              refresh=refresh) for m in self.methods}

    def choose(self, tables: dict) -> Outcome:
        """Search every method, pick the winner, verify it on the other half (stepping back if needed)."""
        self.used_tables = tables
        cands = [self.candidate(m, tables[m]) for m in self.methods]
        paths = [greedy(c, self.info.depth, self.info.tokens, self.search, self.budget, self.step) for c in cands]
        win = pick(paths, self.budget)
        path = next(p for p in paths if p[-1] is win)
        base = path[0].predicted_ms
        why = self._refusal(win, path, base)
        if why is not None:
            return self._unreduced(path, base, why)
        return self._verified(path, base, cands[[c.method for c in cands].index(win.method)])

    def _refusal(self, win: Point, path: list[Point], base: float) -> Optional[str]:
        b = self.budget
        if not any(win.r):
            if b.speed or not self._any_faster(path[0].method):
                return (f"{b.describe()} cannot be met: no reduction is predicted faster than unreduced on "
                        f"{self.backend} at batch {self.batch}; keeping r=0")
            return (f"{b.describe()} cannot be met: no schedule keeps it on the search images (every single step of "
                    f"{self.step} token(s) at any layer already breaks it); keeping r=0")
        if win.predicted_ms > base * (1 - MARGIN):
            return (f"no schedule that keeps {b.describe()} is predicted at least {MARGIN:.0%} faster than "
                    f"unreduced on {self.backend} at batch {self.batch}; keeping r=0")
        if b.speed and win.predicted_ms > b.goal_ms(base):
            return (f"{b.describe()} cannot be met: the fastest schedule found is predicted "
                    f"{base / win.predicted_ms:.2f}x ({win.predicted_ms:.3g} ms) on {self.backend}; keeping r=0")
        return None

    def _any_faster(self, method: str) -> bool:
        """Whether any single step is predicted faster than unreduced (else a fidelity budget is moot)."""
        cand = self.candidate(method, self.used_tables[method])
        base = cand.table.predict(counts_for([0] * self.info.depth, self.info.tokens))
        return any(cand.table.predict(counts_for(r, self.info.tokens)) < base
                   for r in _moves(cand, [0] * self.info.depth, self.step, self.info.tokens))

    def _unreduced(self, path: list[Point], base: float, reason: str) -> Outcome:
        point = Point(path[0].method, [0] * self.info.depth, base, path[0].score)
        return Outcome(point, path, base, False, False, reason, verify=self.verify.unreduced())

    def _verified(self, path: list[Point], base: float, cand: Candidate) -> Outcome:
        """The path's last point if it keeps the budget on the verification half, else the last that does."""
        notes = []
        for i in range(len(path) - 1, 0, -1):
            p = path[i]
            v = self.verify(p.method, p.r, cand.build)
            if self.budget.keeps(v) and p.predicted_ms <= base * (1 - MARGIN):
                if i != len(path) - 1:
                    notes.append(f"the search's winner r={path[-1].r} missed {self.budget.describe()} on the "
                                 f"verification images; stepped back {len(path) - 1 - i} step(s) to r={p.r}")
                return Outcome(p, path, base, True, True, f"{self.budget.describe()} met (predicted "
                               f"{base / p.predicted_ms:.2f}x)", verify=v, notes=notes)
        return self._unreduced(path, base, f"{self.budget.describe()} cannot be met: no schedule on the search's "
                                           "path keeps it on the verification images too; keeping r=0")

    def _measure_speed(self, reduced: nn.Module) -> float:
        from .auto import _measured_speedup

        return _measured_speedup(self.model, reduced, self.backend, self.batch, self.info, self.repeats)

    def measured(self, out: Outcome) -> Outcome:
        """Measure the winner against unreduced (interleaved) and judge the prediction."""
        if not out.reduced:
            return out
        from ..patch.api import apply

        speed = self.speed_fn(apply(self.model, out.point.method, r=out.point.r, **self.params))
        out.measured_speedup = speed
        off = speed / out.predicted_speedup - 1
        if abs(off) > TOLERANCE:
            out.notes.append(f"measured {speed:.2f}x vs predicted {out.predicted_speedup:.2f}x on {self.backend} "
                             f"({off:+.0%}, more than {TOLERANCE:.0%} off)")
        return out

    def run(self, tables: Optional[dict] = None) -> Outcome:
        """Search, verify, measure; off by more than 10 %: re-measure the cost tables once and repeat."""
        self.used_tables = self.tables(given=tables)
        out = self.measured(self.choose(self.used_tables))
        if out.measured_speedup is not None and abs(out.measured_speedup / out.predicted_speedup - 1) > TOLERANCE:
            first = out
            self.used_tables = self.tables(refresh=True)
            out = self.measured(self.choose(self.used_tables))
            out.notes = first.notes + ["cost tables measured again and the search repeated"] + out.notes
        return self.judged(out)

    def judged(self, out: Outcome) -> Outcome:
        """Never slower than unreduced; a speed budget the measurement misses says so."""
        speed, b = out.measured_speedup, self.budget
        if speed is None:
            return out
        if speed < 1.0:
            new = self._unreduced(out.path, out.baseline_ms, f"the chosen r={out.point.r} measured {speed:.2f}x "
                                  f"on {self.backend}: slower than unreduced, keeping r=0")
            new.notes, new.measured_speedup = out.notes, speed
            return new
        if b.speed and (speed < (b.min_speedup or 0) or
                        (b.budget_ms is not None and out.baseline_ms / speed > b.budget_ms)):
            out.goal_met = False
            out.reason = (f"predicted to meet {b.describe()} but measured {speed:.2f}x on {self.backend} "
                          f"(predicted {out.predicted_speedup:.2f}x): the goal is not met")
        return out

    def uniform(self, table: CostTable, points: int = 8) -> list[dict]:
        """ToMe's uniform r (clamped as ToMe does) on the search half: the curve beside the tuned schedule."""
        from ..patch.api import apply

        info = self.info
        top = max(1, math.ceil((info.tokens - info.num_prefix) / info.depth))
        rs = sorted({max(1, round(top * k / points)) for k in range(1, points + 1)})
        params = self.params if "tome" in self.methods else {}
        base = table.predict(counts_for([0] * info.depth, info.tokens))
        out = []
        for r in rs:
            model = apply(self.model, "tome", r=r, clamp=True, **params)
            per_layer = list(model.edgetok_plan.params["r"])
            ms = table.predict(counts_for(per_layer, info.tokens))
            out.append({"r": r, "per_layer": per_layer, "predicted_ms": ms, "predicted_speedup": base / ms,
                        "score": self.search("tome-uniform", per_layer, lambda _r, m=model: m)})
        return out


# -- outputs ---------------------------------------------------------------------------------------
def schedule_record(out: Outcome, params: dict) -> dict:
    """The schedule file `edgetok export --r @FILE` reads."""
    return {"edgetok_schedule": 1, "method": out.point.method, "r": list(out.point.r), "params": dict(params)}


def read_schedule(path, method: str, params: dict) -> tuple[list[int], dict]:
    """(r, params) from a schedule file written by ``edgetok tune``; ``params`` given on the
    command line win over the file's. One-line errors for a missing or foreign file."""
    import json
    from pathlib import Path

    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise TuneError(f"cannot read schedule file {p} ({type(e).__name__}); give the schedule.json "
                        "`edgetok tune` wrote") from None
    if not isinstance(data, dict) or not isinstance(data.get("r"), list):
        raise TuneError(f"{p} is not an edgetok schedule file (no 'r' list); give the schedule.json "
                        "`edgetok tune` wrote")
    if data.get("method", method) != method:
        raise TuneError(f"{p} is a schedule for --method {data['method']}, not {method}; add --method {data['method']}")
    return [int(v) for v in data["r"]], {**dict(data.get("params") or {}), **params}


def report(tuner: Tuner, out: Outcome, uniform: list[dict], extra: Optional[dict] = None) -> dict:
    """Everything the run found, for tune_report.json."""
    from ..validate.timing import machine_facts

    return {
        "budget": asdict(tuner.budget), "budget_text": tuner.budget.describe(),
        "method": out.point.method, "r": list(out.point.r), "params": tuner.params,
        "reduced": out.reduced, "goal_met": out.goal_met, "reason": out.reason, "notes": out.notes,
        "backend": tuner.backend, "batch": tuner.batch, "step": tuner.step, "methods_searched": tuner.methods,
        "baseline_ms": out.baseline_ms, "predicted_ms": out.point.predicted_ms,
        "predicted_speedup": out.predicted_speedup, "measured_speedup": out.measured_speedup,
        "search": out.point.score, "verify": out.verify,
        "images": {"search": tuner.search.unreduced()["images"], "verify": tuner.verify.unreduced()["images"]},
        "path": [p.to_dict() for p in out.path], "tome_uniform": uniform,
        "cost_tables": {m: t.to_dict() for m, t in getattr(tuner, "used_tables", {}).items()},
        "machine": machine_facts(), **(extra or {}),
    }


def plot(rep: dict, path) -> None:
    """Pareto plot: predicted speed-up against fidelity on the search half; the search's path, ToMe's
    uniform r, the chosen point (and its verification-half value) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..validate.figures import save_figure

    top1 = rep["budget"]["max_top1_drop"] is not None
    key, label = ("top1_drop", "top-1 change (points)") if top1 else ("cos_mean", "mean feature cosine to unreduced")
    sign = -1.0 if top1 else 1.0  # top-1 drawn as the change (up is better), like the cosine
    base = rep["baseline_ms"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [base / p["predicted_ms"] for p in rep["path"]]
    uni = rep["tome_uniform"]
    ax.plot(xs, [sign * p["score"][key] for p in rep["path"]], "o-", ms=3, label=f"edgetok tune path ({rep['method']})")
    ax.plot([u["predicted_speedup"] for u in uni], [sign * u["score"][key] for u in uni], "s--", ms=4,
            label="ToMe uniform r")
    for u in rep["tome_uniform"]:
        ax.annotate(f"r={u['r']}", (u["predicted_speedup"], sign * u["score"][key]), fontsize=7)
    ax.plot([rep["predicted_speedup"]], [sign * rep["search"][key]], "*", ms=16, color="red",
            label="chosen (search half)")
    if rep["verify"].get(key) is not None:
        ax.plot([rep["predicted_speedup"]], [sign * rep["verify"][key]], "x", ms=10, color="black",
                label="chosen (verification half)")
    ax.set_xlabel(f"predicted speed-up on {rep['backend']} batch {rep['batch']}")
    ax.set_ylabel(label)
    ax.set_title(f"budget: {rep['budget_text']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def tune(model: nn.Module, images: torch.Tensor, budget: Budget, labels: Optional[torch.Tensor] = None,
         backend: str = "ort-cpu", batch: int = 1, methods: Sequence[str] = ("tome",), params: Optional[dict] = None,
         step: Optional[int] = None, feature: str = "pooled", search_limit: Optional[int] = None,
         repeats: int = 10, cache=None, tables: Optional[dict] = None, speed_fn: Optional[Callable] = None,
         seed: int = 0, uniform_points: int = 8) -> tuple[Outcome, dict]:
    """(Outcome, report dict) for ``model`` on ``images`` [N,3,H,W] (preprocessed) under ``budget``.
    ``tables``: {method: CostTable} instead of measuring; ``speed_fn(reduced) -> speed-up``
    instead of timing the winner (tests)."""
    from .export import check_method

    for m in methods:
        check_method(m)
    if budget.max_top1_drop is not None and labels is None:
        raise TuneError("a top-1 budget needs labels: give an .npz with an integer 'labels' array")
    (xs, ys), (xv, yv) = split(images, labels, seed, search_limit)
    search = CachedScores(Scorer(model, xs, ys, feature), model)
    verify = CachedScores(Scorer(model, xv, yv, feature), model)
    tuner = Tuner(model, budget, search, verify, backend, batch, methods, params, step, repeats, cache, speed_fn)
    out = tuner.run(tables)
    table = tuner.used_tables.get("tome") or (tables or {}).get("tome")
    if table is None:
        from .auto import measure_table

        table = measure_table(model, backend, batch, repeats, method="tome", cache=cache)
    uniform = tuner.uniform(table, uniform_points)
    return out, report(tuner, out, uniform, {"feature": feature, "seed": seed})
