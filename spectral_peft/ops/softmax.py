"""Softmax along one axis, max-subtracted, and its backward.

Shape legend: x, y, dy, dx (...), any shape; the softmax runs along ``axis`` (default the last).

Forward:  y_i = e^(x_i - m) / Σ_j e^(x_j - m),  m = max_j x_j   (subtracting m changes nothing
          mathematically and keeps every exponent <= 0, so nothing overflows)
Backward: dx_i = y_i (dy_i - Σ_j dy_j y_j)     (the Jacobian diag(y) - y yᵀ applied to dy)
The cache holds y only.
"""
from __future__ import annotations

from ..backend import get_xp


def softmax_forward(x, axis: int = -1):
    """y = softmax(x) along ``axis``.  x (...) -> y (...); cache (y, axis)."""
    if getattr(x, "dtype", None) is None or x.dtype.kind != "f" or x.ndim == 0:
        raise ValueError(f"softmax_forward: x must be a float array with at least one axis, got {getattr(x, 'dtype', type(x))}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"softmax_forward: axis {axis} is out of range for x of shape {tuple(x.shape)}")
    xp = get_xp(x)
    y = x - x.max(axis=axis, keepdims=True)  # x - m, every entry <= 0
    xp.exp(y, out=y)
    # Σ_j by NumPy, not a BLAS gemv: the gemv is faster alone, but a 2-thread gemv stalls on a
    # shared machine (docs/performance.md: 3.06 vs 0.74 ms under load)
    y /= y.sum(axis=axis, keepdims=True)
    return y, (y, axis)


def softmax_backward(dy, cache):
    """dx (...) of y = softmax(x): dx = y ⊙ (dy - Σ dy ⊙ y)."""
    y, axis = cache
    if dy.shape != y.shape:
        raise ValueError(f"softmax_backward: dy must have the forward's shape {tuple(y.shape)}, got {tuple(dy.shape)}")
    xp = get_xp(dy)
    # Σ_j dy_j y_j: a row-wise dot, with no (...) temporary, along the last axis
    if axis in (-1, y.ndim - 1):
        s = xp.einsum("...i,...i->...", dy, y)[..., None]
    else:
        s = (dy * y).sum(axis=axis, keepdims=True)
    # y = softmax(x)  =>  dx = y (dy - Σ dy y)
    dx = dy - s
    dx *= y
    return dx
