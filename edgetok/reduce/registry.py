"""Registry of reduction methods: ``edgetok.apply(model, NAME, **params)``."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import UnknownMethodError
from .base import Reducer


@dataclass
class Plan:
    """What a method puts into a model: one reducer (or None) per block, and
    whether attention adds log(size) (proportional attention)."""

    method: str
    params: dict
    reducers: list[Optional[Reducer]]
    prop_attn: bool = False
    adaptive: bool = False
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[..., Plan]
    summary: str
    # "blocks": build(depth, tokens, protect, **params) -> Plan, reducers between ViT blocks;
    # "output": build(model, **params) wraps a ViT encoder (DTD);
    # "model": build(model, **params) -> reduced copy, for families outside the ViT adapters (DETR, T5, DiT)
    kind: str = "blocks"


_METHODS: dict[str, Method] = {}


def register_method(name: str, summary: str, kind: str = "blocks"):
    """Decorator registering ``build(info, **params) -> Plan`` under ``name``."""

    def deco(fn):
        _METHODS[name] = Method(name, fn, summary, kind)
        return fn

    return deco


def _load_builtin() -> None:
    # by module path: ``from . import methods`` would find the package's re-exported
    # methods() function instead of the methods module, and register nothing
    importlib.import_module(f"{__package__}.methods")


def get_method(name: str) -> Method:
    _load_builtin()
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def methods() -> dict[str, str]:
    """Registered method names with a one-line summary each."""
    _load_builtin()
    return {name: m.summary for name, m in sorted(_METHODS.items())}


def takes_param(name: str, param: str) -> bool:
    """Whether method ``name``'s build function takes ``param`` (e.g. tome's ``clamp``, which
    `edgetok export` turns on unless --strict)."""
    import inspect

    return param in inspect.signature(get_method(name).build).parameters
