"""Inverted dropout: y = x ⊙ m / (1 - p), m ~ Bernoulli(1 - p), and its backward.

Shape legend: x, y, dy, dx (...), any shape; the mask has x's shape, dtype bool.

The mask is drawn from the generator passed in (numpy.random.Generator or CuPy's), so the same seed
gives bitwise-identical masks. Dividing by (1 - p) at training time keeps E[y] = x, so evaluation is
the identity. The cache holds the boolean mask (1 byte per element) and the scale.
"""
from __future__ import annotations

from ..backend import get_xp


def dropout_forward(x, p: float, rng, training: bool):
    """y = x ⊙ m / (1 - p).  x (...) -> y (...); cache (mask (...) bool, 1/(1-p)), or None.

    Identity (y is x itself, cache None) when not training or p == 0.
    """
    try:
        p = float(p)  # a Python or NumPy scalar
    except (TypeError, ValueError):
        raise ValueError(f"dropout_forward: p must be a float in [0, 1), got {p!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_forward: p must be a float in [0, 1), got {p!r}")
    if x.dtype.kind != "f":
        raise ValueError(f"dropout_forward: x must be a float array, got dtype {x.dtype}")
    if not training or p == 0:
        return x, None
    u = rng.random(x.shape, dtype=x.dtype)  # (...) uniform in [0, 1)
    keep = u >= p  # (...) bool, True with probability 1 - p
    scale = 1.0 / (1.0 - p)
    y = u  # the uniforms' buffer becomes y: no second (...) float array is allocated
    get_xp(x).multiply(x, scale, out=y)
    y *= keep
    return y, (keep, scale)


def dropout_backward(dy, cache):
    """y = x ⊙ m / (1 - p)  =>  dx = dy ⊙ m / (1 - p); dx is dy itself when the forward was the identity."""
    if cache is None:
        return dy
    keep, scale = cache
    if dy.shape != keep.shape:
        raise ValueError(f"dropout_backward: dy must have the forward's shape {tuple(keep.shape)}, got {tuple(dy.shape)}")
    dx = dy * scale
    dx *= keep
    return dx
