"""Per-layer reduction schedules and their validation against token counts.

A schedule gives each transformer block one value of the method's knob: a
merge/drop count ``r`` (ToMe, top-k), a keep rate (EViT), or a similarity
threshold (DyMU). ``resolve`` turns the user's spelling into one value per
layer; the methods then check each layer against the tokens that reach it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

from ..errors import ScheduleError


@dataclass(frozen=True)
class Linear:
    """Linearly changing value from ``start`` at the first layer to ``end`` at the last
    (ToMe's "decreasing schedule" is ``Linear(2*r, 0)``)."""

    start: float
    end: float

    def values(self, depth: int) -> list[float]:
        if depth == 1:
            return [self.start]
        step = (self.end - self.start) / (depth - 1)
        return [self.start + step * i for i in range(depth)]


ScheduleSpec = Union[int, float, Sequence[float], Linear, str]


def parse(spec: ScheduleSpec) -> ScheduleSpec:
    """Parse the CLI spellings: "8", "8,8,4,0", "linear:16:0"."""
    if not isinstance(spec, str):
        return spec
    text = spec.strip()
    try:
        if text.startswith("linear:"):
            start, end = text.split(":")[1:]
            return Linear(float(start), float(end))
        if "," in text:
            return [float(v) for v in text.split(",") if v.strip()]
        return float(text)
    except ValueError:
        raise ScheduleError(
            f"cannot read schedule {spec!r}: use a number ('8'), one value per layer "
            "('8,8,4,0') or 'linear:START:END'"
        ) from None


def resolve(spec: ScheduleSpec, depth: int, name: str = "r") -> list[float]:
    """One value per layer from a constant, a per-layer list or a Linear schedule."""
    spec = parse(spec)
    if isinstance(spec, Linear):
        return spec.values(depth)
    if isinstance(spec, (int, float)):
        return [spec] * depth
    values = list(spec)
    if len(values) != depth:
        raise ScheduleError(
            f"schedule for {name} has {len(values)} values but the model has {depth} layers; "
            f"give one value per layer"
        )
    return values


def resolve_counts(spec: ScheduleSpec, depth: int, name: str = "r") -> list[int]:
    """Integer per-layer counts (r); fractional Linear values round down like ToMe's."""
    spec = parse(spec)
    values = resolve(spec, depth, name)
    out = []
    for i, v in enumerate(values):
        if v < 0 or (not isinstance(spec, Linear) and float(v) != int(v)):
            raise ScheduleError(f"layer {i}: {name}={v} must be a non-negative integer")
        out.append(int(math.floor(v)))
    return out


def keep_from_rate(n: int, rate: float, protect_first: int) -> int:
    """Tokens kept at a layer with ``n`` tokens and keep rate ``rate`` (EViT rounding:
    ceil over the unprotected tokens, protected ones always kept)."""
    if not 0.0 < rate <= 1.0:
        raise ScheduleError(f"keep_rate={rate} must be in (0, 1]")
    return protect_first + math.ceil(rate * (n - protect_first))
