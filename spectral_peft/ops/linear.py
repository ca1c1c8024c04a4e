"""Linear: y = x Wᵀ + b, the forward/backward pair every projection in the engine uses.

Shapes: x (N, d_in) or (..., d_in); W (d_out, d_in); b (d_out,); y (..., d_out).
"""
from __future__ import annotations


def linear_forward(x, W, b=None, keep_x: bool = True):
    """y = x Wᵀ + b.  (..., d_in) -> (..., d_out).

    The cache holds x only when ``keep_x`` (it is needed for dW alone; dX needs only W, which
    the caller passes to the backward: parameters are never counted as cached activations).
    """
    # One GEMM over all tokens: NumPy runs a 3-D (B, T, d_in) @ 2-D product as B small ones (~4x slower).
    y = (x.reshape(-1, x.shape[-1]) @ W.T).reshape(*x.shape[:-1], W.shape[0])  # (N, d_in) -> (N, d_out)
    if b is not None:
        y += b
    return y, (x if keep_x else None, b is not None)


def linear_backward(dy, cache, W, need_dW: bool = True, need_dx: bool = True):
    """Gradients of y = x Wᵀ + b: returns (dx, dW, db); each is None when not asked for/no bias."""
    x, has_bias = cache
    d_out = dy.shape[-1]
    dy2 = dy.reshape(-1, d_out)  # (N, d_out)
    dW = db = dx = None
    if need_dW:
        if x is None:
            raise RuntimeError("linear_backward: dW was asked for but the forward did not keep x")
        # y = x Wᵀ  =>  dW = dYᵀ x     (d_out, N) @ (N, d_in) -> (d_out, d_in)
        dW = dy2.T @ x.reshape(-1, x.shape[-1])
    if has_bias:
        # y = ... + b  =>  db = Σ_N dY
        db = dy2.sum(axis=0)
    if need_dx:
        # y = x Wᵀ  =>  dX = dY W     (..., d_out) @ (d_out, d_in) -> (..., d_in)
        dx = (dy2 @ W).reshape(*dy.shape[:-1], W.shape[1])
    return dx, dW, db
