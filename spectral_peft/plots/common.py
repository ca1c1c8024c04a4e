"""What every plotting module shares: a headless matplotlib, method colours, saving.

Plot functions (in plots/<topic>.py) take plain data (dicts and lists as stored in results.json,
or arrays) and an output path, write one image and return nothing; the format follows the path's
suffix. They never read the results file themselves: figures.py does, then calls them.
"""
from __future__ import annotations

import os

from ..adapters.registry import RECIPES

# One fixed colour per method, so every figure of a run reads the same way.
METHOD_COLORS = {
    "full": "#000000", "lora": "#1f77b4", "rslora": "#17becf", "dora": "#9467bd", "dylora": "#8c564b",
    "lorafa": "#bcbd22", "deltalora": "#e377c2", "adalora": "#2ca02c", "rosa": "#d62728", "qlora": "#ff7f0e",
    "qrosa": "#7f7f7f",
}


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib  # noqa: PLC0415 - imported on demand: plotting is the only user

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def color(method: str) -> str:
    return METHOD_COLORS.get(method, "#333333")


def label(method: str) -> str:
    """The method's title, as its recipe (adapters/registry.py) names it."""
    return RECIPES[method].title if method in RECIPES else method


def save(fig, path) -> None:
    """Write ``fig`` to ``path`` (creating its folder) and close it."""
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
