"""CLCA in a model: carrier tokens, the block loop with the cross-layer cache, the CLA head.

``attach(model, base=...)`` (what ``edgetok.apply(model, "clca", ...)`` calls)
reduces a copy of ``model`` with the base method, wraps each reduction step so
the cache tokens skip it (edgetok.reduce.clca.CacheStep), adds ``model.clca``
(carrier tokens + CLA head) and swaps in a class whose forward is ``run`` below:
embed, append carriers, blocks (the generic block forward of patch/base.py,
with the base method's reducers), snapshots and recoveries, CLA head. Works for
every adapter family (the head reads the class token, or the size-weighted mean
of the image tokens for models without one). Method, citation and departures:
edgetok/reduce/clca.py.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import EdgetokError, ScheduleError
from ..reduce import clca as _clca
from ..reduce.registry import Plan, get_method, register_method
from .base import Adapter, block_forward


class CLCAParts(nn.Module):
    """What CLCA adds to a model: ``carrier_tokens`` [1, carriers, C] and ``head`` (CLAHead),
    plus its static layout (plain attributes, read by ``run``)."""

    def __init__(self, dim: int, classes: int, sched: _clca.Schedule, carriers: int, gap: bool, prefix: int,
                 has_cls: bool, width: int, keep_classifier: bool, init: torch.Tensor):
        super().__init__()
        self.carriers, self.gap, self.prefix, self.has_cls = carriers, gap, prefix, has_cls
        self.keep_classifier = keep_classifier
        self.recover_at = list(sched.recover_at)
        self.summary_layers = list(sched.summary_layers)
        self.last_snapshot = max(self.recover_at) if self.recover_at and (carriers or gap) else -1
        self.schedule = sched
        self.carrier_tokens = nn.Parameter(init.reshape(1, 1, dim).repeat(1, carriers, 1).clone())
        self.head = _clca.CLAHead(dim, len(self.summary_layers), classes, width, zero_init=keep_classifier)

    def extra_repr(self) -> str:
        return (f"carriers={self.carriers}, gap={self.gap}, recover_at={self.recover_at}, "
                f"summary_layers={self.summary_layers}, keep_classifier={self.keep_classifier}")


@dataclass
class Outputs:
    """Everything ``run`` computes: logits, the last tokens/sizes (cache tokens included),
    how many of them are prefix + image tokens, and the CLA head's input [B, L, C]."""

    logits: torch.Tensor
    tokens: torch.Tensor
    size: Optional[torch.Tensor]
    main: int
    feats: torch.Tensor


def run(adapter: Adapter, model: nn.Module, *args, **kwargs) -> Outputs:
    """The CLCA forward (``adapter``: the base family's adapter)."""
    parts: CLCAParts = model.clca
    plan = model.edgetok_plan
    x = adapter.embed(model, *args, **kwargs)
    if parts.carriers:
        x = torch.cat([x, parts.carrier_tokens.expand(x.shape[0], -1, -1)], dim=1)
    size, tail, cache, feats = None, parts.carriers, [], []
    for i, block in enumerate(adapter.blocks(model)):
        x, size = block_forward(adapter, block, x, size, plan.prop_attn, plan.adaptive)
        main = x.shape[1] - tail
        if i in parts.recover_at and cache:
            x, size = _clca.recover(x, size, cache)
            tail += sum(c.shape[1] for c in cache)
            cache = []
        if i < parts.last_snapshot:
            cache.append(_clca.snapshot(x, size, main, parts.prefix, parts.carriers, parts.gap))
        if i in parts.summary_layers:
            if parts.has_cls:
                feats.append(x[:, 0])
            else:
                s = None if size is None else size[:, parts.prefix:main]
                feats.append(_clca.weighted_mean(x[:, parts.prefix:main], s))
    main = x.shape[1] - tail
    stacked = torch.stack(feats, dim=1)
    logits = parts.head(stacked)
    if parts.keep_classifier:
        logits = logits + adapter.finish(model, x[:, :main], None if size is None else size[:, :main])
    return Outputs(logits, x, size, main, stacked)


class CLCAAdapter(Adapter):
    """The base family's adapter with CLCA's forward; everything else delegates."""

    def __init__(self, base: Adapter):
        self.base = base
        self.family, self.examples = base.family, base.examples

    def matches(self, model) -> bool:
        return False  # found through the model class only

    def check(self, model) -> None:
        self.base.check(model)

    def info(self, model):
        return self.base.info(model)

    def blocks(self, model):
        return self.base.blocks(model)

    def embed(self, model, *args, **kwargs):
        return self.base.embed(model, *args, **kwargs)

    def qkv(self, block, x):
        return self.base.qkv(block, x)

    def scale(self, block) -> float:
        return self.base.scale(block)

    def attn_delta(self, block, o):
        return self.base.attn_delta(block, o)

    def mlp_delta(self, block, x):
        return self.base.mlp_delta(block, x)

    def finish(self, model, x, size, *args, **kwargs):
        return self.base.finish(model, x, size, *args, **kwargs)

    def forward(self, model, *args, **kwargs):
        return run(self.base, model, *args, **kwargs).logits


_ADAPTERS: dict = {}
_CLASSES: dict = {}


def _clca_class(cls: type, base: Adapter) -> type:
    if cls not in _CLASSES:
        adapter = _ADAPTERS.setdefault(id(base), CLCAAdapter(base))

        def forward(self, *args, **kwargs):
            """Logits of the CLA head (plus the model's own classifier with keep_classifier)."""
            return run(base, self, *args, **kwargs).logits

        def forward_tokens(self, *args, **kwargs):
            """Tokens after the last block (cache tokens at the end) and their sizes."""
            out = run(base, self, *args, **kwargs)
            return out.tokens, out.size

        def forward_clca(self, *args, **kwargs) -> Outputs:
            """Logits, last tokens and sizes, and the CLA head's input, in one pass."""
            return run(base, self, *args, **kwargs)

        attrs = {"forward": forward, "forward_tokens": forward_tokens, "forward_clca": forward_clca,
                 "_edgetok_adapter": adapter, "__module__": __name__}
        name = "CLCA" + cls.__name__.removeprefix("Reduced")
        _CLASSES[cls] = type(name, (cls,), attrs)
    return _CLASSES[cls]


def _classes_of(model: nn.Module, adapter: Adapter) -> int:
    """Number of classes the model's classifier outputs (from one forward of a zero image)."""
    info = adapter.info(model)
    with torch.no_grad():
        was = model.training
        out = model.eval()(torch.zeros(1, *info.input_shape))
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise EdgetokError(f"CLCA needs a classifier (a [batch, classes] output); this {info.family} model returns "
                           f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else list(out.shape)}")
    return out.shape[1]


def _carrier_init(model: nn.Module, adapter: Adapter, info, has_cls: bool) -> torch.Tensor:
    """The embedded class token (image-independent), else the mean embedded patch of a zero image."""
    with torch.no_grad():
        was = model.training
        tokens = adapter.embed(model.eval(), torch.zeros(1, *info.input_shape))
        model.train(was)
    return (tokens[0, 0] if has_cls else tokens[0, info.num_prefix:].mean(0)).detach()


def _base_model(model: nn.Module, base: Optional[str], params: dict) -> nn.Module:
    import edgetok

    if base is None:
        if getattr(model, "edgetok_plan", None) is None:
            raise ScheduleError("clca needs a base reduction: pass base='drop' (or 'tome', 'none', any ViT block "
                                "method) with its parameters, or apply clca to a model reduced by edgetok.apply")
        if params:
            raise ScheduleError(f"this model is already reduced by {model.edgetok_plan.method!r}; "
                                f"{', '.join(sorted(params))} cannot change it (apply clca to the original model "
                                "with base=... instead)")
        if model.edgetok_plan.method == "clca":
            raise ScheduleError("this model already has CLCA")
        return copy.deepcopy(model)
    if getattr(model, "edgetok_plan", None) is not None:
        raise ScheduleError(f"this model is already reduced by {model.edgetok_plan.method!r}; apply clca with "
                            f"base={base!r} to the original model, or without base to keep its reduction")
    if base == "none":
        if params:
            raise ScheduleError(f"base='none' takes no reduction parameters (got {', '.join(sorted(params))})")
        return edgetok.apply(model, "tome", r=0)  # the unreduced model in a reducible class
    method = get_method(base)  # UnknownMethodError lists the registered methods
    if method.kind != "blocks" or base == "clca":
        raise ScheduleError(f"clca composes with the ViT block methods (drop, tome, divprune, ...); {base!r} is not one "
                            f"(its kind is {method.kind!r})")
    return edgetok.apply(model, base, **params)


@register_method("clca", "CLCA cross-layer cache + aggregation head on top of any ViT reduction (base=drop, tome, ...)",
                 kind="model")
def attach(model: nn.Module, base: Optional[str] = None, keep_rate=None, r=None, layers=None,
           base_params: Optional[dict] = None, carriers: int = 1, gap: bool = False, recover_at=None,
           width: int = 2, keep_classifier: bool = False, seed: int = 0) -> nn.Module:
    """A CLCA copy of ``model``: reduced by ``base`` (with ``keep_rate``/``r``/``layers``
    and ``base_params``), or by the method already applied to ``model`` when ``base``
    is None. ``carriers``/``gap``: what the cache keeps per layer; ``recover_at``: blocks
    after which it is recovered (default: the reduction blocks); ``width``: filters per
    channel in the CLA head; ``seed``: initialisation of the new parameters."""
    from . import adapter_for

    params = dict(base_params or {})
    for name, value in (("keep_rate", keep_rate), ("r", r), ("layers", layers)):
        if value is not None:
            params[name] = value
    adapter = adapter_for(model)
    reduced = _base_model(model, base, params)
    base_plan = reduced.edgetok_plan
    info = adapter.info(reduced)
    has_cls = bool(getattr(reduced, "has_class_token", info.num_prefix >= 1))
    classes = _classes_of(reduced, adapter)
    blocks = list(adapter.blocks(reduced))
    steps = [getattr(b, "token_reducer", None) for b in blocks]
    sched = _clca.schedule(info.depth, info.tokens, steps, carriers, gap, recover_at)
    for i, block in enumerate(blocks):
        if steps[i] is not None or sched.recovered[i]:
            block.token_reducer = _clca.CacheStep(steps[i], sched.trailing[i], sched.recovered[i])
    init = _carrier_init(reduced, adapter, info, has_cls)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        parts = CLCAParts(info.dim, classes, sched, carriers, gap, info.num_prefix, has_cls, width, keep_classifier,
                          init)
    finally:
        torch.random.set_rng_state(gen_state)
    reduced.clca = parts
    base_name = "none" if base == "none" else base_plan.method
    reduced.edgetok_plan = Plan(
        "clca",
        {"base": base_name, "base_params": base_plan.params, "carriers": carriers, "gap": gap,
         "recover_at": sched.recover_at, "width": width, "keep_classifier": keep_classifier, "seed": seed},
        [b.token_reducer if hasattr(b, "token_reducer") else None for b in blocks],
        prop_attn=base_plan.prop_attn and base != "none",
        adaptive=base_plan.adaptive,
        summary={"schedule": sched.to_dict()},
    )
    reduced.__class__ = _clca_class(type(reduced), adapter)
    return reduced.train(model.training)


def flops(model: nn.Module):
    """Exact per-layer token counts and FLOPs (batch 1) of a CLCA model (edgetok.flops counts
    the cache tokens only approximately: see docs/clca.md)."""
    parts = getattr(model, "clca", None)
    if not isinstance(parts, CLCAParts):
        raise EdgetokError("not a CLCA model: build one with edgetok.apply(model, 'clca', base=...)")
    adapter = type(model)._edgetok_adapter
    info = adapter.info(model)
    steps = [getattr(b, "token_reducer", None) for b in adapter.blocks(model)]
    steps = [s.inner if isinstance(s, _clca.CacheStep) else s for s in steps]
    return _clca.count_flops(info, parts.schedule, steps, parts.head)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What CLCA adds (carriers + CLA head), or a plain model's classifier: the parameters
    a head-only fine-tuning trains."""
    parts = getattr(model, "clca", None)
    if isinstance(parts, CLCAParts):
        params = list(parts.parameters())
        if parts.keep_classifier and hasattr(model, "get_classifier"):
            params += list(model.get_classifier().parameters())
        return params
    if hasattr(model, "get_classifier"):
        return list(model.get_classifier().parameters())
    raise EdgetokError(f"cannot find the classifier of {type(model).__name__}: train='all' trains every parameter")
