"""Pruning figure: eval loss against the base's sparsity, with and without the adapter.

Takes ``results["pruning"]`` (spectral_peft/commands/prune_rows.py) and an output path; the dense base
(sparsity 0) is the run's own base model and dense rows.
"""
from __future__ import annotations

from .common import color, label, pyplot, save


def plot_loss_vs_sparsity(record: dict, path) -> dict:
    """One line for the pruned base alone (before fine-tuning) and one per adapter trained on it;
    returns {line: [(sparsity, loss), ...]} as drawn."""
    plt = pyplot()
    points = sorted(record["points"], key=lambda p: p["sparsity"])
    dense = record.get("dense", {})
    lines = {"base (no adapter)": [(p["sparsity"], p["base_eval_loss"]) for p in points]}
    if dense.get("base_eval_loss") is not None:
        lines["base (no adapter)"].insert(0, (0.0, dense["base_eval_loss"]))
    names = sorted({n for p in points for n in p["adapted"]})
    for n in names:
        pts = [(p["sparsity"], p["adapted"][n]) for p in points if n in p["adapted"]]
        if n in dense:
            pts.insert(0, (0.0, dense[n]["eval_loss"]))
        lines[label(n)] = pts
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for i, (name, pts) in enumerate(lines.items()):
        xs, ys = zip(*pts)
        style = dict(color="#333333", linestyle="--") if i == 0 else dict(color=color(names[i - 1]))
        ax.plot([100 * x for x in xs], ys, marker="o", label=name, **style)
    how = record["score"] + (f" {record['nm'][0]}:{record['nm'][1]}" if record.get("nm") else "")
    ax.set_xlabel(f"sparsity of the target linears (%), {how}")
    ax.set_ylabel("eval loss (nats/byte)")
    ax.set_title("Pruned frozen base: eval loss with and without the adapter")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)
    return lines
