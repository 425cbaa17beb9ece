"""Imports the methods that wrap a whole model (they need the model families of this
layer) so their @register_method runs: dtd, vlm_output, flexdit (DiT), mrt5 (T5) and
focus_detr (DETR, Deformable-DETR)."""
from . import dit, dtd, focus_detr, hf_t5, vlm_output  # noqa: F401
