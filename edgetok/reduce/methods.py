"""Imports every built-in method module so their @register_method runs."""
from . import drop, dtd, dymu, tome  # noqa: F401
from . import flexdit, focus_detr, mrt5, tail_drop  # noqa: F401,E402  (issue 8: non-ViT/ordered-token methods)
from . import divprune, hired, zero_tprune, diffrate, slim, mustdrop, vlm_output  # noqa: F401,E402  (ViT/VLM methods)
from . import clca  # noqa: F401,E402  (issue 21: CLCA on top of any ViT method)
