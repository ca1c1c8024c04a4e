"""AdaLoRA's figures: the final rank allocation (paper Fig. 3), the budget b(t), the singular values.

Each function takes plain results (dicts, lists, arrays; host or device) and an output path, and
writes one image (the format follows the path's suffix). Shape legend: L layers, M matrix types,
r a layer's rank.
"""
from __future__ import annotations

import re

import numpy as np

from ..backend import to_host
from .common import pyplot



def rank_matrix(rank_pattern: dict) -> tuple[np.ndarray, list[int], list[str]]:
    """{"<...>.h.3.attn.c_attn.lora_E": [bool]*init_r} -> (ranks (M, L) int, layer indices, matrix types).

    The layer index is the last integer component of the path; the matrix type is the rest with the
    layer prefix dropped ("attn.c_attn"). Paths without a layer index go to layer 0.
    """
    cells: dict[tuple[str, int], int] = {}
    for key, pattern in rank_pattern.items():
        path = key[: -len(".lora_E")] if key.endswith(".lora_E") else key
        parts = path.split(".")
        idx = [i for i, p in enumerate(parts) if re.fullmatch(r"\d+", p)]
        layer = int(parts[idx[-1]]) if idx else 0
        mtype = ".".join(parts[idx[-1] + 1:]) if idx else path
        cells[(mtype, layer)] = int(np.sum(np.asarray(pattern, dtype=bool)))
    types = sorted({t for t, _ in cells})
    layers = sorted({i for _, i in cells})
    ranks = np.zeros((len(types), len(layers)), dtype=int)  # (M, L)
    for (t, i), r in cells.items():
        ranks[types.index(t), layers.index(i)] = r
    return ranks, layers, types


def plot_rank_heatmap(rank_pattern: dict, path, title: str = "AdaLoRA final rank per matrix") -> None:
    """Heat map of the final rank of every adapted matrix: rows matrix types, columns layers."""
    plt = pyplot()
    ranks, layers, types = rank_matrix(rank_pattern)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.6 * len(layers)), 1.2 + 0.45 * len(types)))
    im = ax.imshow(ranks, cmap="Greens", aspect="auto", vmin=0)
    for (m, l), r in np.ndenumerate(ranks):
        ax.text(l, m, str(r), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(layers)), [str(i) for i in layers])
    ax.set_yticks(range(len(types)), types)
    ax.set_xlabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_budget(steps, budgets, path, kept=None, title: str = "AdaLoRA budget b(t)") -> None:
    """b(t) over training (a step line), optionally with the triplets actually kept."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.step(np.asarray(steps), np.asarray(budgets), where="post", label="budget b(t)")
    if kept is not None:
        ax.plot(np.asarray(steps), np.asarray(kept), "o", ms=3, label="kept")
    ax.set_xlabel("step")
    ax.set_ylabel("triplets")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_singular_values(singular_values: dict, path, title: str = "AdaLoRA singular values Λ") -> None:
    """|Λ| per module, sorted descending ({name: E (r, 1) or (r,)}); zeros (pruned) shown at the floor."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, E in singular_values.items():
        v = np.sort(np.abs(np.asarray(to_host(E), dtype=np.float64).reshape(-1)))[::-1]
        ax.plot(np.arange(1, v.size + 1), v, marker=".", lw=0.8, label=name)
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("triplet (sorted)")
    ax.set_ylabel("|Λ|")
    ax.set_title(title)
    if len(singular_values) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
