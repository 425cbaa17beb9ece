"""torch.library custom ops, one per reduction step (see library.py)."""
from .library import diff_drop, threshold_merge, token_drop, token_merge

__all__ = ["token_merge", "token_drop", "threshold_merge", "diff_drop"]
