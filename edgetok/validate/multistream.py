"""Many streams through one packed step (edgetok.patch.multistream) against full encoding
of the same N frames as one batch: per step the packed step's time and the full batch's
time (back to back, order alternating), per stream the tokens computed, refreshes and
drift (pooled cosine against full encoding); the summary per stream and per run
(shared by ``edgetok stream`` with several videos and benchmarks/bench_stream.py)."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .stream import _cos, _np
from .timing import Stopwatch

StepFn = Callable[[torch.Tensor], object]  # frames [N,C,H,W] -> MultiStepOutput


@dataclass
class StepRecord:
    index: int
    counts: list  # tokens computed per stream (prefix included)
    changed: list  # patch tokens over the threshold per stream
    refreshed: list  # per stream
    stream_ms: float  # the packed step, all N streams
    full_ms: float  # full encoding of the same N frames as one batch
    pooled_cos: list  # per stream: cosine of the mean patch token, stream vs full


def torch_multistream(encoder) -> StepFn:
    return encoder


def ort_multistream(runner) -> StepFn:
    return lambda frames: runner.step(_np(frames))


def stream_frames(paths: Sequence, size, max_frames: Optional[int] = None, stride: int = 1,
                  offsets: Optional[Sequence[int]] = None) -> Iterator[torch.Tensor]:
    """Frame t of every video, as one batch [N,C,H,W] (video b from its frame ``offsets[b]``);
    ends with the shortest video."""
    from ..runtime.video import frames

    offsets = offsets or [0] * len(paths)
    gens = [itertools.islice(frames(p, size, None, stride), o, None) for p, o in zip(paths, offsets)]
    for i, batch in enumerate(zip(*gens)):
        if max_frames is not None and i >= max_frames:
            return
        yield torch.cat(batch)


def compare_streams(batches: Iterable[torch.Tensor], step: StepFn, full: Callable, num_prefix: int,
                    on_step: Callable[[StepRecord], None] = None) -> list[StepRecord]:
    """Each batch of frames through the packed step and through full encoding (timed back to
    back, the order alternating per step)."""
    records = []
    for i, frames in enumerate(batches):
        timed = {}
        for name in (("stream", "full") if i % 2 else ("full", "stream")):
            watch = Stopwatch()
            timed[name] = (step if name == "stream" else full)(frames)
            timed[name + "_ms"] = watch.ms
        out = timed["stream"]
        s, f = _np(out.tokens), _np(timed["full"])
        cos = [float(_cos(s[b, num_prefix:].mean(0), f[b, num_prefix:].mean(0))) for b in range(s.shape[0])]
        rec = StepRecord(i, _list(out.counts), _list(out.changed), [bool(r) for r in _list(out.refreshed)],
                         timed["stream_ms"], timed["full_ms"], cos)
        records.append(rec)
        if on_step:
            on_step(rec)
    return records


def _list(t) -> list:
    return _np(t).tolist()


def summarize_streams(records: list[StepRecord], tokens: int, names: Optional[Sequence[str]] = None,
                      skip_first: bool = True) -> dict:
    """Encoder time per stream relative to full encoding of the same frames as one batch
    (total full ms / total step ms, the first step, a full one, excluded; ``speedup_paired``:
    1 / the mean over frames of step ms / full ms, each pair timed back to back), and per stream
    the tokens computed, refreshes and the mean and worst pooled cosine."""
    timed = records[1:] if skip_first and len(records) > 1 else records
    n = len(records[0].counts)
    names = list(names) if names else [f"stream {b}" for b in range(n)]
    per = []
    for b in range(n):
        cos = [r.pooled_cos[b] for r in records]
        worst = int(np.argmin(cos))
        per.append({"stream": names[b], "computed_share": float(np.mean([r.counts[b] / tokens for r in timed])),
                    "refreshes": sum(r.refreshed[b] for r in records), "pooled_cos_mean": float(np.mean(cos)),
                    "pooled_cos_worst": cos[worst], "worst_frame": records[worst].index})
    return {
        "streams": n, "steps": len(records),
        "speedup": sum(r.full_ms for r in timed) / max(sum(r.stream_ms for r in timed), 1e-9),
        # the full batch does the same work every frame, so stream_ms / full_ms of a back-to-back pair is that
        # frame's cost in full-encoding units under the load of that moment: its mean is the load-corrected cost
        "speedup_paired": 1.0 / max(float(np.mean([r.stream_ms / max(r.full_ms, 1e-9) for r in timed])), 1e-9),
        "stream_ms_per_stream": float(np.median([r.stream_ms for r in timed])) / n,
        "full_ms_per_stream": float(np.median([r.full_ms for r in timed])) / n,
        "computed_share": float(np.mean([sum(r.counts) / (n * tokens) for r in timed])),
        "pooled_cos_mean": float(np.mean([p["pooled_cos_mean"] for p in per])),
        "pooled_cos_worst": min(p["pooled_cos_worst"] for p in per),
        "per_stream": per,
    }


def records_json(records: list[StepRecord]) -> list[dict]:
    return [asdict(r) for r in records]
