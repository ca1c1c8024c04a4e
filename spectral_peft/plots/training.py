"""Figures of the fine-tuning comparison: loss curves, memory, speed against quality, the base
model's pretraining, and the singular values of each method's learned ΔW.

Inputs are MethodResult dicts as stored in results.json (spectral_peft.results): each has
``method``, ``train_curve`` {step, loss}, ``eval_curve`` {step, loss}, ``trainable_params``,
``frozen_weight_bytes``, ``peak_activation_bytes``, ``ms_per_step``, ``final_eval_loss`` and
``extras`` (``singular_values``: {layer: [σ1 ≥ σ2 ≥ ...]}).
"""
from __future__ import annotations

import numpy as np

from .common import color, label, pyplot, save


def _smooth(values, window: int) -> np.ndarray:
    """Trailing moving average (window clipped at the start), so curves keep their length."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or window <= 1:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss_curves(methods: list[dict], path, base_eval_loss: float | None = None,
                     title: str = "Fine-tuning: loss per method") -> None:
    """Two panels: training loss (smoothed) and held-out eval loss against step, one line per method."""
    plt = pyplot()
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for m in methods:
        steps = m["train_curve"]["step"]
        window = max(1, len(steps) // 15)
        ax_t.plot(steps, _smooth(m["train_curve"]["loss"], window), color=color(m["method"]), lw=1.2,
                  label=label(m["method"]))
        ax_e.plot(m["eval_curve"]["step"], m["eval_curve"]["loss"], marker="o", ms=3, color=color(m["method"]),
                  lw=1.2, label=label(m["method"]))
    if base_eval_loss is not None:
        ax_e.axhline(base_eval_loss, color="#999999", ls=":", lw=1, label="base model")
    ax_t.set_title("training objective (moving average; AdaLoRA's includes its regulariser)", fontsize=9)
    ax_e.set_title("eval loss (held-out docstrings)")
    for ax in (ax_t, ax_e):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/byte)")
        ax.grid(alpha=0.3)
    ax_e.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    save(fig, path)


def plot_memory(methods: list[dict], path, title: str = "Memory per method") -> None:
    """Grouped bars per method: frozen-weight bytes, peak activation bytes, trainable-parameter
    bytes (params × 4, float32) — the three memory items that differ between methods."""
    plt = pyplot()
    names = [label(m["method"]) for m in methods]
    frozen = np.array([m["frozen_weight_bytes"] for m in methods], dtype=np.float64) / 2**20
    act = np.array([m["peak_activation_bytes"] for m in methods], dtype=np.float64) / 2**20
    train = np.array([m["trainable_params"] * 4 for m in methods], dtype=np.float64) / 2**20
    x = np.arange(len(methods))
    w = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(methods) + 2), 4))
    ax.bar(x - w, frozen, w, label="frozen weights", color="#4c72b0")
    ax.bar(x, act, w, label="peak activations", color="#dd8452")
    ax.bar(x + w, train, w, label="trainable params (fp32)", color="#55a868")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    save(fig, path)


def plot_speed_quality(methods: list[dict], path, title: str = "Time per step against final eval loss") -> None:
    """One point per method: ms/step (x) against final eval loss (y), labelled."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m in methods:
        ax.scatter(m["ms_per_step"], m["final_eval_loss"], color=color(m["method"]), s=40)
        ax.annotate(label(m["method"]), (m["ms_per_step"], m["final_eval_loss"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("ms / step (median)")
    ax.set_ylabel("final eval loss (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save(fig, path)


def plot_pretraining(loss_curve: list[float], path, title: str = "Base model pretraining (stdlib source)") -> None:
    """The base model's training loss per step (raw and smoothed)."""
    plt = pyplot()
    v = np.asarray(loss_curve, dtype=np.float64)
    steps = np.arange(1, v.size + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, v, color="#bbbbbb", lw=0.8, label="per step")
    ax.plot(steps, _smooth(v, max(1, v.size // 20)), color="#1f77b4", lw=1.5, label="moving average")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def plot_delta_spectra(methods: list[dict], path, layer: str | None = None,
                       title: str = "Singular values of the learned ΔW") -> None:
    """σ_i of ΔW = W_adapted − W_base for one adapted layer (the same for every method), normalised
    by σ_1, one line per method: how many directions each method actually uses."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    chosen = layer
    for m in methods:
        sv = m.get("extras", {}).get("singular_values") or {}
        if not sv:
            continue
        if chosen is None or chosen not in sv:
            chosen = sorted(sv)[-1] if chosen is None else chosen
        s = np.asarray(sv.get(chosen, []), dtype=np.float64)
        if s.size == 0 or s[0] <= 0:
            continue
        ax.semilogy(np.arange(1, s.size + 1), s / s[0], marker=".", color=color(m["method"]), lw=1,
                    label=label(m["method"]))
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title(f"{title}\n({chosen})" if chosen else title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)
