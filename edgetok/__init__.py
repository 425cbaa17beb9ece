"""edgetok: exportable, fused, measured token reduction for vision transformers.

    import edgetok, timm
    vit = timm.create_model("vit_small_patch16_224")
    fast = edgetok.apply(vit, "tome", r=8)
    edgetok.flops(fast, (3, 224, 224)).total
"""
from .ops import library as _ops  # noqa: F401  (registers the edgetok:: torch ops)
from .ops.plugins import register_cuda_kernels

register_cuda_kernels()  # fused CUDA kernels for the ops where plugins/ is built; loads nothing until first use
from .patch.api import apply, flops, methods, token_counts
from .errors import EdgetokError, ScheduleError, UnknownMethodError, UnsupportedModelError

from ._version import __version__

__all__ = [
    "apply",
    "flops",
    "methods",
    "token_counts",
    "EdgetokError",
    "ScheduleError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "__version__",
]
