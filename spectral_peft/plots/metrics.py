"""The performance metrics of a run over its steps: throughput and memory, one line per method.

Input: the lines of a run's metrics.jsonl (spectral_peft.monitor), each a dict with ``step``,
``tokens_per_s``, ``peak_rss_bytes``, ``param_bytes``, ``grad_bytes``, ``optimizer_bytes``,
``activation_bytes`` and ``method`` (lines without one form a single series). A field a line
lacks, or holds as null (the throughput of a skipped step), leaves a gap in that line.
"""
from __future__ import annotations

import numpy as np

from .common import color, label, pyplot, save

# (field, panel title, scale, unit) of each panel, in order
PANELS = (
    ("tokens_per_s", "throughput", 1.0, "tokens / s"),
    ("peak_rss_bytes", "process peak RSS", 2**-20, "MiB"),
    ("param_bytes", "parameters", 2**-20, "MiB"),
    ("grad_bytes", "gradients", 2**-20, "MiB"),
    ("optimizer_bytes", "optimiser state", 2**-20, "MiB"),
    ("activation_bytes", "cached activations", 2**-20, "MiB"),
)


def series(lines: list[dict]) -> dict[str, list[dict]]:
    """{method: its lines in file order}; lines without a "method" go under ""."""
    out: dict[str, list[dict]] = {}
    for line in lines:
        out.setdefault(str(line.get("method") or ""), []).append(line)
    return out


def values(lines: list[dict], field: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values · scale) of ``field``, NaN where a line lacks it or holds null."""
    steps = np.array([float(line["step"]) for line in lines])
    v = np.array([np.nan if line.get(field) is None else float(line[field]) * scale for line in lines])
    return steps, v


def plot_metrics(lines: list[dict], path, title: str = "Throughput and memory per step") -> None:
    """A 2×3 grid, one panel per field of PANELS, each holding one line per method against step."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    groups = series(lines)
    for ax, (field, name, scale, unit) in zip(axes.flat, PANELS):
        for method, rows in groups.items():
            steps, v = values(rows, field, scale)
            ax.plot(steps, v, color=color(method), lw=1.2, label=label(method) if method else "run")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    save(fig, path)
