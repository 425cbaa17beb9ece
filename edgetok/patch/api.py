"""The public entry points: apply, methods, flops."""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import EdgetokError, InputShapeError
from . import adapter_for, methods as _model_methods, reduce_model  # noqa: F401  (registers them)
from .base import run_blocks
from ..reduce import flops as _flops
from ..reduce.registry import get_method, methods  # noqa: F401  (re-exported)


def _bind(method, params: dict) -> None:
    sig = inspect.signature(method.build)
    allowed = [p for p in sig.parameters if p not in ("depth", "tokens", "protect", "model")]
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise EdgetokError(
            f"method {method.name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(allowed)}"
        )


def apply(model: nn.Module, method: str, **params) -> nn.Module:
    """A reduced copy of ``model`` (the input is not modified).

    ``method`` is a registered method name (see ``methods()``); ``params`` are
    the method's knobs, e.g. ``apply(vit, "tome", r=8)``,
    ``apply(vit, "drop", keep_rate=0.7)``, ``apply(vit, "dymu", threshold=0.9)``.
    """
    spec = get_method(method)
    _bind(spec, params)
    if spec.kind == "model":
        return spec.build(model=model, **params)
    adapter = adapter_for(model)
    info = adapter.info(model)
    if spec.kind == "output":
        return spec.build(model=model, **params)
    plan = spec.build(info.depth, info.tokens, info.num_prefix, **params)
    return reduce_model(model, adapter, plan).train(model.training)


def token_counts(model: nn.Module, x: torch.Tensor) -> list[int]:
    """Tokens entering each block of ``model`` on input ``x``, then the final count
    (for adaptive methods: the batch maximum, padding included)."""
    adapter = adapter_for(model)
    record: list[int] = []
    with torch.no_grad():
        run_blocks(adapter, model, adapter.embed(model, x), record)
    return record


def flops(model: nn.Module, input_shape: Optional[Sequence[int]] = None, inputs: Optional[torch.Tensor] = None):
    """Per-layer token counts and FLOPs (batch 1) of a reduced or plain model.

    ``input_shape`` is (C, H, W) or (B, C, H, W) and must match the model's
    input size; adaptive methods report their upper bound unless ``inputs``
    (real images) are given, in which case the measured counts are used.
    """
    adapter = adapter_for(model)
    info = adapter.info(model)
    if input_shape is not None:
        shape = tuple(input_shape)[-3:]
        if shape != info.input_shape:
            raise InputShapeError(
                f"input_shape {tuple(input_shape)} does not match the model's input {info.input_shape}"
            )
    plan = getattr(model, "edgetok_plan", None)
    reducers = plan.reducers if plan is not None else [None] * info.depth
    measured = token_counts(model, inputs) if inputs is not None and plan is not None and plan.adaptive else None
    report = _flops.count(info, reducers, measured)
    if plan is not None and plan.adaptive and measured is None:
        report.notes.append(f"{plan.method} is adaptive: token counts are upper bounds; pass inputs= to measure")
    return report
