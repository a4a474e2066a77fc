"""Writing matplotlib figures safely."""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_write

__all__ = ["save_figure"]


def save_figure(fig, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Lay out, write atomically (a reader never sees half a PNG) and release the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=dpi, format="png")
    plt.close(fig)
    return path
