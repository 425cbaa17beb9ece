"""Focus-DETR on Hugging Face DETR and Deformable-DETR models: picks the family's
patch (edgetok/patch/hf_detr.py, hf_deformable_detr.py) and its foreground scorer;
the method (scores, selection) is edgetok/reduce/focus_detr.py."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..errors import ScheduleError
from ..reduce.focus_detr import ForegroundScorer, build_focus_detr
from ..reduce.registry import register_method
from . import hf_deformable_detr, hf_detr


@register_method("focus_detr", "Focus-DETR: foreground-scored top-k queries per DETR encoder layer "
                 "(HF DetrModel, DeformableDetrModel)", kind="model")
def focus_detr(model: nn.Module, keep_rate=0.3, scorer: Optional[nn.Module] = None, scorer_path: Optional[str] = None,
          seed: int = 0) -> nn.Module:
    """A Focus-DETR copy of a Hugging Face DETR or Deformable-DETR model. ``scorer``/``scorer_path``:
    foreground scorer to use (default: a random ForegroundScorer seeded with ``seed``)."""
    if hf_deformable_detr.is_deformable_detr(model):
        patch, enc = hf_deformable_detr, hf_deformable_detr.deformable_detr_encoder(model)
        levels = model.config.num_feature_levels
    else:
        patch, enc, levels = hf_detr, hf_detr.detr_encoder(model), 1
    dim = enc.config.d_model
    if scorer is None and scorer_path:
        scorer = ForegroundScorer.load(scorer_path, dim, levels=levels)
    elif scorer is None:
        scorer = ForegroundScorer(dim, seed=seed, levels=levels)
    elif getattr(scorer, "levels", levels) != levels:
        raise ScheduleError(f"the scorer is for {scorer.levels} feature level(s), the model has {levels}")
    plan = build_focus_detr(len(enc.layers), keep_rate=keep_rate)
    return patch.reduce(model, plan, scorer)
