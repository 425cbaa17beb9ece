"""Imports every built-in method module of this layer so their @register_method runs; the
methods that wrap a whole model (dtd, vlm_output, flexdit, mrt5, focus_detr) register in
edgetok/patch/methods.py."""
from . import diffrate, divprune, drop, dymu, hired, mustdrop, slim, tail_drop, tome, zero_tprune  # noqa: F401
from . import clca  # noqa: F401,E402  (CLCA on top of any ViT method)
