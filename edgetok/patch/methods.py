"""Imports the methods that wrap a whole model (they need the model families of this
layer) so their @register_method runs: dtd, vlm_output, flexdit (DiT), mrt5 (T5),
focus_detr (DETR, Deformable-DETR) and clca (any ViT block method)."""
from . import clca, dit, dtd, focus_detr, hf_t5, vlm_output  # noqa: F401
