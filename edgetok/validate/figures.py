"""Figures written like every other output: rendered in memory, then written atomically."""
from __future__ import annotations

import io
from pathlib import Path

from ..runtime.artifacts import write_atomic


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Save a matplotlib figure to ``path`` (format from the suffix) atomically, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
