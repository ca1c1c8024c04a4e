"""LayerNorm (GPT-2, BERT) and RMSNorm (LLaMA) over the last axis, forward and backward.

Shape legend: x (..., C), flattened to N rows of width C; weight, bias (C,); rstd (..., 1).

LayerNorm:  μ = mean(x),  σ² = mean((x - μ)²),  r = 1/sqrt(σ² + eps),  x̂ = (x - μ) r,
            y = x̂ ⊙ w + b
RMSNorm:    r = 1/sqrt(mean(x²) + eps),  x̂ = x r,  y = x̂ ⊙ w

Both caches hold x̂ (..., C) and r (..., 1): x̂ is what the backward needs for dw and dx, and
keeping it saves re-normalising x (two passes) in the backward. Derivations: docs/ops.md.
"""
from __future__ import annotations

from ..backend import get_xp


def _row_mean(a):
    """mean over the last axis, (..., C) -> (..., 1), as a matrix-vector product with 1/C: BLAS
    gemv, about 4x faster than ``a.mean(-1)`` on the model's shapes."""
    C = a.shape[-1]
    return (a @ get_xp(a).full(C, 1.0 / C, dtype=a.dtype))[..., None]


def _row_dot_mean(a, b):
    """mean over the last axis of a ⊙ b, (..., C) x2 -> (..., 1), without an (..., C) temporary."""
    return get_xp(a).einsum("...i,...i->...", a, b)[..., None] / a.shape[-1]


def _row_mean_weighted(a, w):
    """mean over the last axis of a ⊙ w for a weight vector w (C,): (..., C) -> (..., 1), as the
    BLAS gemv (a @ w) / C (about 5x faster than a row-wise einsum of two (..., C) arrays)."""
    return (a @ w)[..., None] / a.shape[-1]


def _col_sum(a):
    """Σ over every leading axis, (..., C) -> (C,), as ones(N) @ a (BLAS gemv)."""
    a2 = a.reshape(-1, a.shape[-1])  # (N, C)
    return get_xp(a).ones(a2.shape[0], dtype=a.dtype) @ a2


def _check_norm_args(x, weight, bias=None, name: str = "layernorm") -> None:
    C = x.shape[-1] if x.ndim else None
    if x.ndim < 1 or x.dtype.kind != "f":
        raise ValueError(f"{name}: x must be a float array of shape (..., C), got shape {tuple(x.shape)} dtype {x.dtype}")
    if tuple(weight.shape) != (C,):
        raise ValueError(f"{name}: weight must have shape (C,) = ({C},), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"{name}: bias must have shape (C,) = ({C},), got {tuple(bias.shape)}")
    for arg, a in (("weight", weight), ("bias", bias)):
        if a is not None and a.dtype != x.dtype:
            raise ValueError(f"{name}: {arg} must have x's dtype {x.dtype} (no silent up/down-cast), got {a.dtype}")


def layernorm_forward(x, weight, bias, eps: float = 1e-5):
    """y = (x - μ)/sqrt(σ² + eps) ⊙ weight + bias over the last axis.

    x (..., C), weight (C,), bias (C,) or None -> y (..., C); cache (x̂ (..., C), rstd (..., 1)).
    """
    _check_norm_args(x, weight, bias, "layernorm_forward")
    mean = _row_mean(x)  # (..., 1)
    xhat = x - mean  # (..., C)  x - μ
    var = _row_dot_mean(xhat, xhat)  # (..., 1)  biased variance, as PyTorch
    rstd = 1.0 / (var + eps) ** 0.5  # (..., 1)
    xhat *= rstd  # x̂ = (x - μ) r
    y = xhat * weight
    if bias is not None:
        y += bias
    return y, (xhat, rstd)


def layernorm_backward(dy, cache, weight, need_dparams: bool = True):
    """Gradients of y = x̂ ⊙ w + b: returns (dx (..., C), dweight (C,), dbias (C,)); dweight and dbias
    are None when not ``need_dparams`` (a frozen norm: two column sums fewer, dx unchanged bit for bit).

    dx = r · (g - mean(g) - x̂ · mean(g ⊙ x̂))  with g = dy ⊙ w   (docs/ops.md derives it).
    """
    xhat, rstd = cache
    if dy.shape != xhat.shape:
        raise ValueError(f"layernorm_backward: dy must have the forward's shape {tuple(xhat.shape)}, got {tuple(dy.shape)}")
    xp = get_xp(dy)
    # y = x̂ w + b  =>  db = Σ_N dy
    dbias = _col_sum(dy) if need_dparams else None
    # y = x̂ w + b  =>  dw = Σ_N dy ⊙ x̂
    t = dy * xhat  # (..., C)
    dweight = _col_sum(t) if need_dparams else None
    # mean(g ⊙ x̂) = mean((dy ⊙ x̂) ⊙ w) = (t @ w) / C: a BLAS gemv on t, no pass over g and x̂
    mean_gx = _row_mean_weighted(t, weight)  # (..., 1)
    # y = x̂ w  =>  dx̂ = g = dy ⊙ w
    g = dy * weight  # (..., C), becomes dx in place
    # x̂ = (x - μ) r  =>  dx = r (g - mean(g) - x̂ mean(g ⊙ x̂))
    g -= _row_mean(g)
    xp.multiply(xhat, mean_gx, out=t)  # reuse the buffer
    g -= t
    g *= rstd
    return g, dweight, dbias


def rmsnorm_forward(x, weight, eps: float = 1e-6):
    """LLaMA's RMSNorm: y = x / sqrt(mean(x²) + eps) ⊙ weight over the last axis.

    x (..., C), weight (C,) -> y (..., C); cache (x̂ (..., C), rstd (..., 1)).
    """
    _check_norm_args(x, weight, None, "rmsnorm_forward")
    ms = _row_dot_mean(x, x)  # (..., 1)  mean(x²)
    rstd = 1.0 / (ms + eps) ** 0.5  # (..., 1)
    xhat = x * rstd  # (..., C)
    y = xhat * weight
    return y, (xhat, rstd)


def rmsnorm_backward(dy, cache, weight, need_dparams: bool = True):
    """Gradients of y = x̂ ⊙ w, x̂ = x r: returns (dx (..., C), dweight (C,)); dweight is None when
    not ``need_dparams`` (a frozen norm).

    dx = r · (g - x̂ · mean(g ⊙ x̂))  with g = dy ⊙ w.
    """
    xhat, rstd = cache
    if dy.shape != xhat.shape:
        raise ValueError(f"rmsnorm_backward: dy must have the forward's shape {tuple(xhat.shape)}, got {tuple(dy.shape)}")
    xp = get_xp(dy)
    t = dy * xhat  # (..., C)
    # y = x̂ w  =>  dw = Σ_N dy ⊙ x̂
    dweight = _col_sum(t) if need_dparams else None
    # mean(g ⊙ x̂) = (t @ w) / C, a gemv (see layernorm_backward)
    mean_gx = _row_mean_weighted(t, weight)  # (..., 1)
    # y = x̂ w  =>  dx̂ = g = dy ⊙ w
    g = dy * weight
    # x̂ = x r, r = (mean(x²) + eps)^(-1/2)  =>  dx = r (g - x̂ mean(g ⊙ x̂))
    xp.multiply(xhat, mean_gx, out=t)  # reuse the buffer
    g -= t
    g *= rstd
    return g, dweight
