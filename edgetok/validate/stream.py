"""Stream vs full per-frame encoding on one clip: tokens computed, latency and
drift per frame, their summary, and the plot (shared by ``edgetok stream`` and
benchmarks/bench_stream.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import MissingDependencyError
from .figures import save_figure
from .timing import Stopwatch

# frame [1,C,H,W] -> (tokens [B,N,C], computed tokens, slots run, changed patch tokens, refreshed)
StreamFn = Callable[[torch.Tensor], tuple]
FullFn = Callable[[torch.Tensor], object]  # frame -> tokens [B,N,C]


@dataclass
class FrameRecord:
    index: int
    changed: int  # patch tokens over the threshold
    computed: int  # tokens computed and kept (prefix included)
    slots: int  # tokens run through the blocks (the static budget's slots, masked ones included)
    refreshed: bool
    stream_ms: float
    full_ms: float
    pooled_cos: float  # cosine of the mean patch token, stream vs full
    token_cos: float  # mean over tokens of the per-token cosine


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    return (a * b).sum(-1) / den


def torch_stream(encoder) -> StreamFn:
    def run(frame):
        out = encoder(frame)
        return (out.tokens, int(out.computed()[0]), out.idx.shape[1], int(out.changed[0]),
                bool(encoder.refreshed[0]))

    return run


def ort_stream(runner) -> StreamFn:
    def run(frame):
        out = runner.step(_np(frame))
        return (out.tokens, int(out.valid[0].sum()), out.idx.shape[1], int(out.changed[0]),
                bool(runner.refreshed[0]))

    return run


def torch_full(model, mean=None, std=None) -> FullFn:
    from ..patch.stream import encode_full

    return lambda frame: encode_full(model, frame, mean, std)


def ort_full(path, threads=None) -> FullFn:
    from ..runtime.backends import ort_session

    sess = ort_session(path, threads=threads, interleaved=True)  # timed in turns with the streaming step
    return lambda frame: sess.run(None, {sess.get_inputs()[0].name: _np(frame)})[0]


def compare_stream(frames: Iterable[torch.Tensor], stream: StreamFn, full: FullFn, num_prefix: int,
                   on_frame: Callable[[FrameRecord], None] = None) -> list[FrameRecord]:
    """Each frame through the stream and through full encoding (timed back to back, the
    order alternating per frame so drifting machine load hits both alike)."""
    records = []
    for i, frame in enumerate(frames):
        timed = {}
        order = ("stream", "full") if i % 2 else ("full", "stream")
        for name in order:
            watch = Stopwatch()
            timed[name] = (stream if name == "stream" else full)(frame)
            timed[name + "_ms"] = watch.ms
        tokens, computed, slots, changed, refreshed = timed["stream"]
        s, f = _np(tokens)[0], _np(timed["full"])[0]
        rec = FrameRecord(i, changed, computed, slots, refreshed, timed["stream_ms"], timed["full_ms"],
                          float(_cos(s[num_prefix:].mean(0), f[num_prefix:].mean(0))), float(_cos(s, f).mean()))
        records.append(rec)
        if on_frame:
            on_frame(rec)
    return records


def summarize(records: list[FrameRecord], tokens: int, skip_first: bool = True) -> dict:
    """Encoder time relative to full encoding (total full ms / total stream ms, without the
    first frame, which is a full one by definition) and fidelity (mean and worst pooled cosine)."""
    timed = records[1:] if skip_first and len(records) > 1 else records
    worst = min(records, key=lambda r: r.pooled_cos)
    return {
        "frames": len(records),
        "speedup": sum(r.full_ms for r in timed) / max(sum(r.stream_ms for r in timed), 1e-9),
        "stream_ms_median": float(np.median([r.stream_ms for r in timed])),
        "full_ms_median": float(np.median([r.full_ms for r in timed])),
        "computed_share": float(np.mean([r.computed / tokens for r in timed])),
        "slot_share": float(np.mean([r.slots / tokens for r in timed])),
        "refreshes": sum(r.refreshed for r in records),
        "pooled_cos_mean": float(np.mean([r.pooled_cos for r in records])),
        "pooled_cos_worst": worst.pooled_cos,
        "worst_frame": worst.index,
        "token_cos_mean": float(np.mean([r.token_cos for r in records])),
    }


def records_json(records: list[FrameRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def plot(series: dict[str, list[FrameRecord]], tokens: int, path, title: str = "") -> Path:
    """One column per series: computed share, latency (stream vs full) and drift over time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependencyError("plots need matplotlib: pip install 'edgetok[plot]'") from e
    cols = len(series)
    fig, axes = plt.subplots(3, cols, figsize=(4.5 * cols, 7.5), squeeze=False, sharex="col")
    for c, (name, recs) in enumerate(series.items()):
        t = [r.index for r in recs]
        ax = axes[0][c]
        ax.plot(t, [r.computed / tokens for r in recs], label="computed")
        ax.plot(t, [r.changed / tokens for r in recs], label="changed", alpha=0.6)
        if any(r.slots != r.computed for r in recs):
            ax.plot(t, [r.slots / tokens for r in recs], ":", label="slots run (budget)")
        ref = [r.index for r in recs if r.refreshed]
        ax.plot(ref, [1.0] * len(ref), "v", ms=4, label="refresh")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("token share")
        ax.set_ylim(0, 1.08)
        ax.legend(fontsize=7)
        ax = axes[1][c]
        ax.plot(t, [r.full_ms for r in recs], label="full")
        ax.plot(t, [r.stream_ms for r in recs], label="stream")
        ax.set_ylabel("ms / frame")
        ax.legend(fontsize=7)
        ax = axes[2][c]
        ax.plot(t, [1 - r.pooled_cos for r in recs], label="1 - cos pooled")
        ax.plot(t, [1 - r.token_cos for r in recs], label="1 - mean token cos", alpha=0.6)
        ax.set_ylabel("drift vs full")
        ax.set_xlabel("frame")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
