"""RoSA's figures: density per layer, the support pattern of one matrix, loss curves at equal budget.

Each function takes plain results (dicts, lists, arrays; host or device) and an output path, and
writes one image (the format follows the path's suffix). Shape legend: S (d_out, d_in) a support
mask; L adapted layers; T logged steps.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_host
from .common import pyplot



def plot_density_per_layer(densities: dict, path) -> None:
    """Bar chart of the sparse adapter's density per layer. densities: {layer path: float or
    {"density": float, ...}} in model order."""
    plt = pyplot()
    names = list(densities)
    values = [float(v["density"] if isinstance(v, dict) else v) * 100 for v in densities.values()]
    short = names
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(names) + 2), 3.6))
    ax.bar(range(len(values)), values, color="tab:purple")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(short, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("density of S (%)")
    ax.set_title("RoSA: sparse-adapter density per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_support_pattern(mask, path, title: str = "RoSA support") -> None:
    """The support of one (d_out, d_in) matrix, with its row and column counts in the margins
    (gradient-chosen supports cluster in rows and columns)."""
    plt = pyplot()
    m = np.asarray(to_host(mask), dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"plot_support_pattern: mask must be 2-D (d_out, d_in), got shape {m.shape}")
    fig = plt.figure(figsize=(6.4, 5.6))
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), hspace=0.05, wspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    ax_top = fig.add_subplot(grid[0, 0], sharex=ax)
    ax_right = fig.add_subplot(grid[1, 1], sharey=ax)
    rows, cols = np.nonzero(m)
    ax.scatter(cols, rows, s=max(0.2, 2000.0 / max(1, rows.size)), marker="s", color="k", linewidths=0)
    ax.set_xlim(-0.5, m.shape[1] - 0.5)
    ax.set_ylim(m.shape[0] - 0.5, -0.5)
    ax.set_xlabel("input feature (d_in)")
    ax.set_ylabel("output feature (d_out)")
    ax_top.bar(np.arange(m.shape[1]), m.sum(0), width=1.0, color="tab:blue")
    ax_top.set_ylabel("nnz/col")
    ax_top.tick_params(labelbottom=False)
    ax_right.barh(np.arange(m.shape[0]), m.sum(1), height=1.0, color="tab:orange")
    ax_right.set_xlabel("nnz/row")
    ax_right.tick_params(labelleft=False)
    ax_top.set_title(f"{title}: {rows.size} of {m.size} entries ({100 * rows.size / max(1, m.size):.2f}%)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_curves(curves: dict, path, title: str = "LoRA vs RoSA vs sparse-only at equal budget") -> None:
    """Training-loss curves. curves: {label: {"steps": [..], "loss": [..], "params": int (optional)}}
    or {label: [loss, ...]} (steps 0..T-1). The trainable-parameter count goes into the legend."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, c in curves.items():
        if isinstance(c, dict):
            loss = np.asarray(to_host(c["loss"]), dtype=float)
            steps = np.asarray(c.get("steps", np.arange(loss.size)))
            extra = f" ({int(c['params']):,} params)" if "params" in c else ""
        else:
            loss = np.asarray(to_host(c), dtype=float)
            steps, extra = np.arange(loss.size), ""
        ax.plot(steps, loss, label=f"{label}{extra}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
