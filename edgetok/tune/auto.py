"""Latency-aware per-layer schedules: ``--schedule auto --target CONFIG``.

Papers: the greedy trade of fidelity for measured cost follows DiffRate
(Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision
Transformers", ICCV 2023, arXiv:2305.17997), which learns per-layer prune/merge
rates under a FLOPs constraint. Departures: no gradient search (no training
data here): a greedy search adds ``step`` merges to the one layer that buys the
most predicted latency per unit of lost fidelity, until a latency budget or a
minimum speed-up is met; the constraint is measured latency on the target
backend (a cost table), not FLOPs; fidelity is the pooled-feature cosine to
the unreduced model on calibration images (any callable can replace it).

The rule the search never breaks: it does not return a schedule predicted (or,
with ``verify``, measured) slower than the unreduced model on that backend.
When no reduction pays off (batch 1 on small models, where the reduction
step's own cost eats the saving) it returns r=0 everywhere and says why.

Cost table (per model shape, backend, batch and machine; cached as JSON under
~/.cache/edgetok/costs or a given directory): per token count n, the time of
one block, of its MLP half, and the extra time of one reduction step, so a
layer that takes n_in tokens and hands on n_out costs
``block(n_in) - mlp(n_in) + mlp(n_out) + step(n_in)``; a fixed part
(embedding, head) makes the table's baseline equal the measured baseline.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import EdgetokError, ScheduleError
from ..patch.base import block_forward
from ..reduce.registry import get_method

BACKENDS = ("torch-cpu", "torch-cuda", "ort-cpu", "ort-cuda", "openvino")
MARGIN = 0.02  # a schedule must be predicted at least 2% faster than baseline to count as faster


def cache_dir(path: Optional[os.PathLike] = None) -> Path:
    return Path(path) if path else Path(os.environ.get("EDGETOK_CACHE", Path.home() / ".cache" / "edgetok")) / "costs"


@dataclass
class CostTable:
    """Measured costs (ms) at a set of token counts; linear in between."""

    key: dict
    tokens: list[int]  # ascending
    block_ms: list[float]
    mlp_ms: list[float]
    step_ms: list[float]
    fixed_ms: float
    notes: list[str] = field(default_factory=list)

    def _at(self, values: list[float], n: float) -> float:
        return _lerp(self.tokens, values, n)

    def layer(self, n_in: int, n_out: int) -> float:
        ms = self._at(self.block_ms, n_in) - self._at(self.mlp_ms, n_in) + self._at(self.mlp_ms, n_out)
        return ms + (self._at(self.step_ms, n_in) if n_out != n_in else 0.0)

    def predict(self, counts: Sequence[int]) -> float:
        """Latency of a model whose blocks see ``counts`` (entering each block, then the final count)."""
        return self.fixed_ms + sum(self.layer(a, b) for a, b in zip(counts[:-1], counts[1:]))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        return cls(**d)


def cache_key(info, backend: str, batch: int, model_name: str = "") -> dict:
    from ..validate.timing import machine_facts

    m = machine_facts()
    return {
        "model": model_name or info.family,
        "shape": [info.depth, info.dim, info.heads, info.tokens, info.num_prefix],
        "backend": backend,
        "batch": batch,
        "machine": {k: m.get(k) for k in ("cpu", "cores", "torch_threads", "torch", "gpu")},
    }


def _cache_path(key: dict, directory: Optional[os.PathLike]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(directory) / f"{key['backend']}-b{key['batch']}-{digest}.json"


def save_table(table: CostTable, directory: Optional[os.PathLike] = None) -> Path:
    from ..runtime.artifacts import write_json

    return write_json(_cache_path(table.key, directory), table.to_dict())


def load_table(key: dict, directory: Optional[os.PathLike] = None) -> Optional[CostTable]:
    path = _cache_path(key, directory)
    if not path.is_file():
        return None
    table = CostTable.from_dict(json.loads(path.read_text()))
    return table if table.key == key else None


# -- measuring ------------------------------------------------------------------------
def backend_for_config(config) -> str:
    """The backend whose costs stand for an export config's runtime here."""
    if config.runtime == "onnxruntime":
        return "ort-cuda" if config.device in ("cuda", "jetson") else "ort-cpu"
    if config.runtime == "openvino":
        return "openvino"
    raise EdgetokError(
        f"config {config.name!r} runs TensorRT, which is not installed here, so its costs cannot be measured; "
        "measure on the device, or pick --target cpu-ort / cuda-ort (or --backend torch-cuda) as a stand-in"
    )


def _token_grid(n: int) -> list[int]:
    return sorted({n, max(2, n // 8), max(2, n // 4), max(2, n // 2), max(2, 3 * n // 4)})


def _monotone(values: list[float]) -> list[float]:
    out, top = [], 0.0
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


def _lerp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise linear through (xs, ys); proportional to x outside the range."""
    if x <= xs[0]:
        return ys[0] * x / xs[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] * (1 - w) + ys[i] * w
    return ys[-1] * x / xs[-1]


class LayerAt(nn.Module):
    """One block on [B,n,C] tokens, with an optional reduction step, for timing."""

    def __init__(self, adapter, block, reducer=None, mlp_only: bool = False):
        super().__init__()
        self.adapter, self.block, self.reducer, self.mlp_only = adapter, block, reducer, mlp_only

    def forward(self, x):
        if self.mlp_only:
            return x + self.adapter.mlp_delta(self.block, x)
        saved = getattr(self.block, "token_reducer", None)
        self.block.token_reducer = self.reducer
        try:
            return block_forward(self.adapter, self.block, x, None, False, False)[0]
        finally:
            self.block.token_reducer = saved


def one_step(method: str, n: int, r: int, protect: int):
    """The reducer ``method`` puts in a layer that removes r of n tokens."""
    plan = get_method(method).build(1, n, protect, r=[r])
    return plan.reducers[0]


def measure_table(model, backend: str, batch: int, repeats: int = 10, model_name: str = "",
                  method: str = "tome", cache: Optional[os.PathLike] = None, refresh: bool = False) -> CostTable:
    """Time one block, its MLP and one reduction step of ``model`` at several token
    counts on ``backend`` (cached per model shape / method / backend / batch / machine)."""
    from ..patch import adapter_for

    adapter = adapter_for(model)
    info = adapter.info(model)
    key = cache_key(info, backend, batch, model_name) | {"method": method}
    if not refresh and (hit := load_table(key, cache)) is not None:
        return hit
    timer = _timer(backend)
    device = "cuda" if backend.endswith("cuda") else "cpu"
    blocks = adapter.blocks(model)
    block = blocks[len(blocks) // 2]
    grid = _token_grid(info.tokens)
    block_ms, mlp_ms, step_ms = [], [], []
    for n in grid:
        x = torch.randn(batch, n, info.dim, device=device)
        r = n // 4
        mods = {"block": LayerAt(adapter, block), "mlp": LayerAt(adapter, block, mlp_only=True)}
        try:
            mods["step"] = LayerAt(adapter, block, one_step(method, n, r, info.num_prefix))
        except ScheduleError:
            r = 0
        t = timer(mods, x, repeats)
        block_ms.append(t["block"])
        mlp_ms.append(t["mlp"])
        # what the reduced layer costs beyond its attention at n and its MLP at n - r
        extra = t["step"] - (t["block"] - t["mlp"]) - t["mlp"] * (n - r) / n if r else 0.0
        step_ms.append(max(0.0, extra))
    # cost cannot fall as tokens grow: a noisy machine's dips would invite fake savings
    block_ms, mlp_ms = _monotone(block_ms), _monotone(mlp_ms)
    whole = timer({"model": model}, torch.randn(batch, *info.input_shape, device=device), max(3, repeats // 2))
    fixed = max(0.0, whole["model"] - info.depth * block_ms[-1])
    table = CostTable(key, grid, block_ms, mlp_ms, step_ms, fixed,
                      [f"block {len(blocks) // 2} timed; step: {method} removing n//4 tokens"])
    save_table(table, cache)
    return table


def _timer(backend: str) -> Callable:
    if backend not in BACKENDS:
        raise EdgetokError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend.startswith("torch"):
        return _time_torch(backend)
    if backend == "openvino":
        return _time_openvino()
    return _time_ort(backend)


def _time_torch(backend):
    from ..validate.timing import interleaved, summary

    if backend == "torch-cuda" and not torch.cuda.is_available():
        raise EdgetokError("backend torch-cuda needs a CUDA device; none is visible")

    def run(mods, x, repeats):
        dev = "cuda" if backend == "torch-cuda" else "cpu"
        mods = {k: m.to(dev) for k, m in mods.items()}
        with torch.inference_mode():
            times = interleaved({k: (lambda m=m: m(x)) for k, m in mods.items()}, repeats=repeats, device=dev)
        return {k: summary(v)["p50_ms"] for k, v in times.items()}

    return run


def _time_ort(backend):
    """Export each module (edgetok ops with their function bodies) and time it in ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort

    from ..export.exporter import trace
    from ..runtime.backends import ort_session
    from ..validate.timing import interleaved, median

    providers = ["CUDAExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
    if providers[0] not in ort.get_available_providers():
        raise EdgetokError(f"backend {backend} needs onnxruntime with {providers[0]}; install onnxruntime-gpu")

    def run(mods, x, repeats):
        sessions = {k: ort_session(trace(m.cpu().eval(), (x.cpu(),), ["x"]), providers, interleaved=True)
                    for k, m in mods.items()}
        feed = {"x": x.cpu().numpy().astype(np.float32)}
        times = interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, repeats=repeats,
                            warmup=1)
        return {k: median(v) for k, v in times.items()}

    return run


def _time_openvino():
    """Export each module and time it compiled by OpenVINO in float32 (edgetok/runtime/openvino.py)."""
    import numpy as np

    from ..export.exporter import trace
    from ..runtime.openvino import INSTALL, compile_openvino, openvino_missing
    from ..validate.timing import interleaved, median

    if openvino_missing():
        raise EdgetokError(f"backend openvino: {INSTALL}")

    def run(mods, x, repeats):
        compiled = {k: compile_openvino(trace(m.cpu().eval(), (x.cpu(),), ["x"])) for k, m in mods.items()}
        feed = {"x": x.cpu().numpy().astype(np.float32)}
        requests = {k: c.create_infer_request() for k, c in compiled.items()}
        times = interleaved({k: (lambda q=q: q.infer(feed)) for k, q in requests.items()}, repeats=repeats, warmup=1)
        return {k: median(v) for k, v in times.items()}

    return run


# -- the search ---------------------------------------------------------------------------------
def counts_for(r: Sequence[int], tokens: int) -> list[int]:
    out = [tokens]
    for ri in r:
        out.append(out[-1] - ri)
    return out


@dataclass
class AutoSchedule:
    r: list[int]
    predicted_ms: float
    baseline_ms: float
    fidelity: float
    goal_met: bool
    reduced: bool  # False: r=0 everywhere, nothing paid off
    reason: str
    measured_speedup: Optional[float] = None
    trace: list[dict] = field(default_factory=list)

    @property
    def predicted_speedup(self) -> float:
        return self.baseline_ms / self.predicted_ms

    def to_dict(self) -> dict:
        return asdict(self) | {"predicted_speedup": self.predicted_speedup}


def search(table: CostTable, depth: int, tokens: int, fidelity_fn: Callable[[list[int]], float],
           valid: Callable[[list[int]], bool], budget_ms: Optional[float] = None,
           min_speedup: Optional[float] = None, step: Optional[int] = None, margin: float = MARGIN,
           repair: Optional[Callable[[list[int]], Optional[list[int]]]] = None) -> AutoSchedule:
    """Greedy search (see the module docstring). ``fidelity_fn(r) -> float`` (1 = the
    unreduced model); ``valid(r)`` says whether the method can run schedule r; ``repair(r)``
    (optional) turns an invalid r into a runnable one: more merges early leave later
    layers fewer tokens than their r, and without a repair the greedy stops there."""
    if (budget_ms is None) == (min_speedup is None):
        raise ScheduleError("auto schedule needs exactly one goal: a latency budget (ms) or a minimum speed-up")
    base = table.predict(counts_for([0] * depth, tokens))
    goal = budget_ms if budget_ms is not None else base / min_speedup
    step = step or max(1, tokens // 32)
    r, lat, fid, trace = [0] * depth, base, 1.0, []
    while lat > goal:
        best = None
        for i in range(depth):
            cand = list(r)
            cand[i] += step
            if not valid(cand):
                cand = repair(cand) if repair is not None else None
                if cand is None or cand == r or not valid(cand):
                    continue
            c_lat = table.predict(counts_for(cand, tokens))
            if c_lat >= lat:
                continue  # this extra merge costs more than it saves here
            c_fid = fidelity_fn(cand)
            gain = (lat - c_lat) / max(fid - c_fid, 1e-9)
            if best is None or gain > best[0]:
                best = (gain, cand, c_lat, c_fid)
        if best is None:
            break
        _, r, lat, fid = best
        trace.append({"r": list(r), "predicted_ms": lat, "fidelity": fid})
    what = f"budget {budget_ms:.3g} ms" if budget_ms is not None else f"speed-up {min_speedup:g}x"
    if lat > base * (1 - margin):
        return AutoSchedule([0] * depth, base, base, 1.0, False, False,
                            f"no reduction is faster than the unreduced model on {table.key.get('backend')} at batch "
                            f"{table.key.get('batch')} (the reduction step costs more than the tokens it removes "
                            "save): keeping r=0", trace=trace)
    met = lat <= goal
    reason = f"{what} met" if met else f"{what} not reachable: best found {base / lat:.2f}x ({lat:.3g} ms)"
    return AutoSchedule(r, lat, base, fid, met, True, reason, trace=trace)


def cosine_fidelity(model, method: str, images, **params) -> Callable[[list[int]], float]:
    """fidelity_fn: mean pooled-feature cosine of model reduced by ``r`` to the unreduced model."""
    from ..patch.api import apply
    from ..validate.fidelity import cosine, features

    _, ref = features(model, images)
    cache: dict[tuple, float] = {}

    def fid(r):
        if tuple(r) not in cache:
            _, pooled = features(apply(model, method, r=list(r), **params), images)
            cache[tuple(r)] = float(cosine(ref, pooled).mean())
        return cache[tuple(r)]

    return fid


def auto_schedule(model, target=None, backend: Optional[str] = None, batch: Optional[int] = None,
                  method: str = "tome", budget_ms: Optional[float] = None, min_speedup: Optional[float] = None,
                  images=None, table: Optional[CostTable] = None, cache: Optional[os.PathLike] = None,
                  verify: bool = False, repeats: int = 10, step: Optional[int] = None) -> AutoSchedule:
    """Choose per-layer r for ``model`` on ``target`` (an export config name/path/object)
    or ``backend``; ``images`` calibrate the fidelity (default: the shipped photos)."""
    from ..patch.api import apply
    from ..patch import adapter_for

    if target is not None:
        from ..config import ExportConfig, load_config

        config = target if isinstance(target, ExportConfig) else load_config(target)
        backend = backend or backend_for_config(config)
        batch = batch or config.batch.opt
    backend, batch = backend or "torch-cpu", batch or 1
    info = adapter_for(model).info(model)
    table = table or measure_table(model, backend, batch, repeats, method=method, cache=cache)
    if images is None:
        images = _calibration_images(info)

    def valid(r):
        try:
            apply(model, method, r=list(r))
            return True
        except ScheduleError:
            return False

    result = search(table, info.depth, info.tokens, cosine_fidelity(model, method, images), valid,
                    budget_ms, min_speedup, step, repair=_capper(method, info))
    if verify and result.reduced:
        speed = _measured_speedup(model, apply(model, method, r=result.r), backend, batch, info, repeats)
        judge_measured(result, speed, backend, min_speedup, budget_ms)
    return result


def judge_measured(result: AutoSchedule, speed: float, backend: str, min_speedup: Optional[float] = None,
                   budget_ms: Optional[float] = None) -> AutoSchedule:
    """Let the measured speed-up, not the cost table's prediction, decide: slower than
    unreduced -> r=0; under the goal -> ``goal_met`` false, and the reason says so."""
    result.measured_speedup = speed
    if speed < 1.0:
        result.reason += f"; measured {speed:.2f}x on {backend}: slower than unreduced, keeping r=0"
        result.r, result.reduced, result.goal_met = [0] * len(result.r), False, False
        result.predicted_ms, result.fidelity = result.baseline_ms, 1.0
        return result
    short = []
    if min_speedup is not None and speed < min_speedup:
        short.append(f"under the {min_speedup:g}x goal")
    if budget_ms is not None and result.baseline_ms / speed > budget_ms:
        short.append(f"about {result.baseline_ms / speed:.1f} ms, over the {budget_ms:g} ms budget")
    if short:
        result.goal_met = False
        result.reason += (f"; but measured {speed:.2f}x on {backend} (predicted {result.predicted_speedup:.2f}x): "
                          + ", ".join(short))
    return result


def _capper(method: str, info) -> Optional[Callable[[list[int]], Optional[list[int]]]]:
    """For methods with ``clamp`` (ToMe): r with each layer capped at what can merge there."""
    import inspect

    build = get_method(method).build
    if "clamp" not in inspect.signature(build).parameters:
        return None

    def cap(r):
        try:
            return list(build(info.depth, info.tokens, info.num_prefix, r=list(r), clamp=True).params["r"])
        except ScheduleError:
            return None

    return cap


def _calibration_images(info, n: int = 4):
    try:
        from ..validate.fidelity import labelled_set

        return labelled_set(size=info.image_size[0], per_class=2, classes=n // 2).x
    except EdgetokError:
        return torch.randn(n, *info.input_shape, generator=torch.Generator().manual_seed(0))


def _measured_speedup(base, reduced, backend, batch, info, repeats) -> float:
    device = "cuda" if backend.endswith("cuda") else "cpu"
    x = torch.randn(batch, *info.input_shape, device=device)
    t = _timer(backend)({"base": base, "reduced": reduced}, x, repeats)
    return t["base"] / t["reduced"]
