"""Model adapters: where in each model family the reduction goes.

``adapter_for(model)`` finds the adapter of a model; ``reduce_model`` puts a
Plan's reducers into a copy of it. A reduced model keeps its weights, its
state_dict keys and its class (a subclass swapped in, ToMe-style), and gains
``forward_tokens(x) -> (tokens, sizes)`` and ``edgetok_plan``.
"""
from __future__ import annotations

import copy

from torch import nn

from ..errors import EdgetokError, UnsupportedModelError
from .base import Adapter, ModelInfo, run_blocks
from .hf_clip import HFCLIPAdapter
from .hf_dinov2 import HFDinov2Adapter, HFDinov2RegistersAdapter
from .hf_siglip import HFSiglipAdapter
from .hf_vit import HFViTAdapter
from .timm_vit import TimmViTAdapter
from .torchvision_vit import TorchvisionViTAdapter

ADAPTERS: list[Adapter] = [
    TimmViTAdapter(),
    HFViTAdapter(),
    HFCLIPAdapter(),
    HFSiglipAdapter(),
    HFDinov2Adapter(),
    HFDinov2RegistersAdapter(),
    TorchvisionViTAdapter(),
]


def register_adapter(adapter: Adapter) -> Adapter:
    ADAPTERS.append(adapter)
    return adapter


def adapter_for(model: nn.Module) -> Adapter:
    adapter = getattr(type(model), "_edgetok_adapter", None)
    if adapter is None:
        adapter = next((a for a in ADAPTERS if a.matches(model)), None)
    if adapter is None:
        families = "\n  ".join(a.examples for a in ADAPTERS)
        raise UnsupportedModelError(
            f"edgetok has no adapter for {type(model).__module__}.{type(model).__name__}. "
            f"Supported families:\n  {families}"
        )
    adapter.check(model)
    return adapter


_CLASSES: dict = {}


def _reduced_class(cls: type, adapter: Adapter) -> type:
    if cls not in _CLASSES:

        def forward(self, *args, **kwargs):
            return adapter.forward(self, *args, **kwargs)

        def forward_tokens(self, *args, **kwargs):
            """Tokens after the last block and their sizes (None when no step ran)."""
            return run_blocks(adapter, self, adapter.embed(self, *args, **kwargs))

        attrs = {"forward": forward, "forward_tokens": forward_tokens, "_edgetok_adapter": adapter}
        attrs.update(adapter.class_methods())
        _CLASSES[cls] = type(f"Reduced{cls.__name__}", (cls,), {"__module__": __name__, **attrs})
    return _CLASSES[cls]


def reduce_model(model: nn.Module, adapter: Adapter, plan) -> nn.Module:
    if hasattr(model, "edgetok_plan"):
        raise EdgetokError(
            f"this model is already reduced by {model.edgetok_plan.method!r}; apply edgetok to the original model"
        )
    reduced = copy.deepcopy(model)
    reduced.__class__ = _reduced_class(type(model), adapter)
    for block, reducer in zip(adapter.blocks(reduced), plan.reducers):
        if reducer is not None:
            block.token_reducer = reducer
    reduced.edgetok_plan = plan
    return reduced


__all__ = ["Adapter", "ModelInfo", "adapter_for", "reduce_model", "register_adapter", "ADAPTERS"]
