"""The low-rank branch shared by LoRA, its family, RoSA and QLoRA: y = s · (x Aᵀ) Bᵀ.

Shapes: x (..., d_in); A (r, d_in); B (d_out, r); s a float scale; y (..., d_out).
The product is taken as (x Aᵀ) Bᵀ, never as x (B A)ᵀ: two skinny products of cost 2·N·r·(d_in + d_out)
instead of forming the (d_out, d_in) matrix.
"""
from __future__ import annotations


def lowrank_forward(x, A, B, scale: float, keep_x: bool = True):
    """y = s · (x Aᵀ) Bᵀ.  (..., d_in) -> (..., d_out).

    The cache keeps xa = x Aᵀ (N, r), needed for dB, and x only when ``keep_x`` (needed for dA
    alone: LoRA-FA freezes A and so keeps only the (N, r) product, its memory saving).
    """
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in): one GEMM over all tokens
    xa = x2 @ A.T  # (N, d_in) @ (d_in, r) -> (N, r)
    y = (xa @ B.T).reshape(*x.shape[:-1], B.shape[0])  # (N, r) @ (r, d_out) -> (..., d_out)
    y *= scale
    return y, (x if keep_x else None, xa)


def lowrank_backward(dy, cache, A, B, scale: float, need_dA: bool = True, need_dB: bool = True,
                     need_dx: bool = True):
    """Gradients of y = s · (x Aᵀ) Bᵀ: returns (dx, dA, dB), None for those not asked for."""
    x, xa = cache
    r = A.shape[0]
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
    xa2 = xa.reshape(-1, r)  # (N, r)
    dA = dB = dx = None
    if need_dB:
        # y = s · xa Bᵀ  =>  dB = s · dYᵀ xa     (d_out, N) @ (N, r) -> (d_out, r)
        dB = dy2.T @ xa2
        dB *= scale
    dxa = None
    if need_dA or need_dx:
        # y = s · xa Bᵀ  =>  dxa = s · dY B      (N, d_out) @ (d_out, r) -> (N, r)
        dxa = dy2 @ B
        dxa *= scale
    if need_dA:
        if x is None:
            raise RuntimeError("lowrank_backward: dA was asked for but the forward did not keep x")
        # xa = x Aᵀ  =>  dA = dxaᵀ x             (r, N) @ (N, d_in) -> (r, d_in)
        dA = dxa.T @ x.reshape(-1, x.shape[-1])
    if need_dx:
        # xa = x Aᵀ  =>  dx = dxa A              (N, r) @ (r, d_in) -> (N, d_in)
        dx = (dxa @ A).reshape(*dy.shape[:-1], A.shape[1])
    return dx, dA, dB
