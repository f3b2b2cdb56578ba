"""Figures without pyplot: every renderer builds a ``matplotlib.figure.Figure`` directly, so drawing
never changes matplotlib's global backend (a notebook keeps its inline backend, and a returned
figure shows there), and PNGs are written atomically."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .runner import atomic_write_bytes


def new_figure(rows: int = 1, cols: int = 1, figsize: tuple[float, float] | None = None, **kwargs) -> tuple[Figure, Any]:
    """``(figure, axes)`` as ``pyplot.subplots`` gives them, made without pyplot."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kwargs)


def _show_in_notebooks() -> None:
    """Figures made without pyplot show themselves in IPython/Jupyter as PNGs (an analysis's ``draw_*``
    returns one; ``%matplotlib inline`` is not needed)."""
    import sys

    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None:
        def png(fig: Figure) -> bytes:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100)
            return buffer.getvalue()

        shell.display_formatter.formatters["image/png"].for_type(Figure, png)


_show_in_notebooks()


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def finish(fig: Figure, path: str | Path | None = None) -> Figure:
    """Lay ``fig`` out, save it to ``path`` when given, and return it."""
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def heatmap_pixels(grid, lo: float, hi: float, cmap: str = "jet"):
    """(H, W) values -> uint8 (H, W, 3) through the colour map ``cmap`` over ``[lo, hi]``: the heat maps of
    Fig. 7, drawn the same in the figure and in the viewer."""
    import numpy as np
    import torch
    from matplotlib import colormaps

    scaled = ((torch.as_tensor(grid).float() - lo) / max(hi - lo, 1e-12)).clamp(0, 1).numpy()
    return (colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)


def label_colors(count: int):
    """``count`` distinct colours, float (count, 3) in [0, 1], for a label map (Fig. 7e), in the order
    the labels are listed: tab10 up to ten labels, tab20 beyond (repeating past twenty)."""
    import numpy as np
    from matplotlib import colormaps

    colors = np.array(colormaps["tab10" if count <= 10 else "tab20"].colors)
    return colors[np.arange(count) % len(colors)]
