"""The low-rank branch shared by LoRA, its family, RoSA and QLoRA: y = s · (x Aᵀ) Bᵀ.

Shapes: x (..., d_in); A (r, d_in); B (d_out, r); s a float scale; y (..., d_out).
The product is taken as (x Aᵀ) Bᵀ, never as x (B A)ᵀ: two skinny products of cost 2·N·r·(d_in + d_out)
instead of forming the (d_out, d_in) matrix.

Fused with the base: given ``out`` (the base's output y₀ = x Wᵀ, forward) or ``dx_out`` (the base's
dX₀ = dY W, backward), the branch is ADDED into it by one in-place gemm (ops.linear.matmul_add):
y = y₀ + s · xa Bᵀ and dX = dX₀ + dxa A, with no (N, d_out) or (N, d_in) temporary. The stacked
alternative (forward: one GEMM x [W; A]ᵀ, y a strided view of it; backward: [dY, s·dY B] [W; A])
was implemented and measured (docs/performance.md, "Fused [W; A] or not"): alone it wins
0.04–0.4 ms per layer in the forward (benchmarks/lora.py --fusion) but it lost 5–10 ms on the
whole LoRA step, where the strided y slows the ops downstream; so the branch keeps its own x Aᵀ
and dY B products (N, r). Concatenated along the contraction instead (lowrank_stacked_forward),
y = [x | xa | 1] [Wᵀ; s·Bᵀ; b] is one GEMM whose y is an ordinary C-contiguous array: LoRA's float32
forward takes it where d_out > d_in, and the backward's dx = [dY | s·dY B] [W; A]
(lowrank_stacked_backward) where d_out < d_in (docs/performance.md, "One GEMM over [x | xa | 1]").
"""
from __future__ import annotations

from ..backend import get_xp
from .linear import matmul_add


def _add_into(out, a, b, alpha: float):
    """out (..., n) += α · a (N, k) @ b (k, n), in place; returns ``out``. A C-contiguous ``out``
    flattens to (N, n) as a view and takes the product by one gemm (matmul_add); a strided one
    takes it as out += α · (a b) reshaped."""
    n = out.shape[-1]
    if out.flags.c_contiguous:
        matmul_add(out.reshape(-1, n), a, b, alpha)
    else:
        prod = a @ b
        prod *= alpha
        out += prod.reshape(out.shape)
    return out


def lowrank_forward(x, A, B, scale: float, keep_x: bool = True, out=None, bias=None):
    """y = s · (x Aᵀ) Bᵀ.  (..., d_in) -> (..., d_out); with ``out`` (..., d_out): out += y in place,
    and ``out`` is returned as y. With ``bias`` (d_out,) (and no ``out``): y = s · (x Aᵀ) Bᵀ + bias,
    the bias folded into the second product as [xa | 1] [s·Bᵀ; bias] (N, r+1) @ (r+1, d_out), so
    adding it costs no pass over y (a frozen base's bias, for its product to be accumulated onto y).

    The cache keeps xa = x Aᵀ (N, r), needed for dB, and x only when ``keep_x`` (needed for dA
    alone: LoRA-FA freezes A and so keeps only the (N, r) product, its memory saving). x is kept
    as given (the caller's array, no copy).
    """
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in): one GEMM over all tokens
    if bias is not None:
        if out is not None:
            raise ValueError("lowrank_forward: give out or bias, not both")
        r, d_out = A.shape[0], B.shape[0]
        xp = get_xp(x)
        aug = xp.empty((x2.shape[0], r + 1), dtype=x2.dtype)  # [xa | 1]  (N, r + 1)
        xp.matmul(x2, A.T, out=aug[:, :r])  # xa = x Aᵀ, a view of aug (rows r + 1 apart)
        aug[:, r] = 1
        Bb = xp.empty((r + 1, d_out), dtype=B.dtype)  # [s·Bᵀ; bias]  (r + 1, d_out)
        xp.multiply(B.T, scale, out=Bb[:r])
        Bb[r] = bias
        y = (aug @ Bb).reshape(*x.shape[:-1], d_out)  # s · xa Bᵀ + bias
        return y, (x if keep_x else None, aug[:, :r])
    xa = x2 @ A.T  # (N, d_in) @ (d_in, r) -> (N, r)
    if out is None:
        y = (xa @ B.T).reshape(*x.shape[:-1], B.shape[0])  # (N, r) @ (r, d_out) -> (..., d_out)
        y *= scale
    else:
        if out.shape != (*x.shape[:-1], B.shape[0]):
            raise ValueError(f"lowrank_forward: out must have shape {(*x.shape[:-1], B.shape[0])}, got {out.shape}")
        # y = out + s · xa Bᵀ, accumulated into out
        y = out
        _add_into(out, xa, B.T, scale)
    return y, (x if keep_x else None, xa)


def lowrank_stacked_forward(x, xd, A, B, scale: float, V, keep_x: bool = True):
    """y = x Wᵀ + s · (xd Aᵀ) Bᵀ + b as ONE GEMM over operands concatenated along the contraction:

        y = [x | xd Aᵀ | 1] @ V,   V = [Wᵀ; s·Bᵀ; bᵀ]        (N, d_in + r + 1) @ (d_in + r + 1, d_out)

    x (..., d_in) the base's input, xd (..., d_in) the branch's (x, or x under dropout); V (d_in + r + 1,
    d_out) float32 holds Wᵀ in its first d_in rows and b (or 0) in its last, both kept there by the
    caller; the r rows between are written here with s·Bᵀ. -> y (..., d_out), a fresh C-contiguous
    array written once, and the cache of :func:`lowrank_forward` (x when ``keep_x``, xa (N, r) its own
    array: the (N, d_in + r + 1) operand is not kept). Where d_out > d_in this is cheaper than the
    small product plus the base's accumulating gemm (both write y; the copy of x here is smaller than
    y): docs/performance.md, "One GEMM over [x | xa | 1]".
    """
    xp = get_xp(x)
    d_in, r = A.shape[1], A.shape[0]
    x2 = x.reshape(-1, d_in)
    xs = xp.empty((x2.shape[0], d_in + r + 1), dtype=x2.dtype)  # [x | xa | 1]  (N, d_in + r + 1)
    xs[:, :d_in] = x2
    xa = xd.reshape(-1, d_in) @ A.T  # xa = xd Aᵀ  (N, r), kept by the cache
    xs[:, d_in:d_in + r] = xa
    xs[:, d_in + r] = 1
    xp.multiply(B.T, scale, out=V[d_in:d_in + r])  # s·Bᵀ  (r, d_out)
    y = (xs @ V).reshape(*x.shape[:-1], V.shape[1])  # x Wᵀ + s · xa Bᵀ + b
    return y, (xd if keep_x else None, xa)


def lowrank_backward(dy, cache, A, B, scale: float, need_dA: bool = True, need_dB: bool = True,
                     need_dx: bool = True, dx_out=None, dxa_out=None):
    """Gradients of y = s · (x Aᵀ) Bᵀ: returns (dx, dA, dB), None for those not asked for.

    With ``dx_out`` (..., d_in) (and need_dx), the branch's dx is added into it in place and
    ``dx_out`` is returned as dx. With ``dxa_out`` (N, r) (a view into a caller's buffer, e.g. the
    stacked operand of :func:`lowrank_stacked_backward`), dxa = s·dY B is written there."""
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
    if need_dA or need_dx or dxa_out is not None:
        # y = s · xa Bᵀ  =>  dxa = s · dY B      (N, d_out) @ (d_out, r) -> (N, r)
        dxa = dy2 @ B if dxa_out is None else get_xp(dy).matmul(dy2, B, out=dxa_out)
        dxa *= scale
    if need_dA:
        if x is None:
            raise RuntimeError("lowrank_backward: dA was asked for but the forward did not keep x")
        # xa = x Aᵀ  =>  dA = dxaᵀ x             (r, N) @ (N, d_in) -> (r, d_in)
        dA = dxa.T @ x.reshape(-1, x.shape[-1])
    if need_dx:
        # xa = x Aᵀ  =>  dx = dxa A              (N, r) @ (r, d_in) -> (N, d_in)
        if dx_out is None:
            dx = (dxa @ A).reshape(*dy.shape[:-1], A.shape[1])
        else:
            if dx_out.shape != (*dy.shape[:-1], A.shape[1]):
                raise ValueError(f"lowrank_backward: dx_out must have shape {(*dy.shape[:-1], A.shape[1])}, "
                                 f"got {dx_out.shape}")
            dx = _add_into(dx_out, dxa, A, 1.0)  # dx = dx_out + dxa A, in place
    return dx, dA, dB


def lowrank_stacked_backward(dy, cache, A, B, scale: float, U, need_dA: bool = True, need_dB: bool = True):
    """Gradients of y = x Wᵀ + s · (x Aᵀ) Bᵀ (frozen W) with dx as ONE GEMM over operands stacked
    along the contraction:

        dx = [dY | s·dY B] @ [W; A]        (N, d_out + r) @ (d_out + r, d_in)

    U (d_out + r, d_in) float32 holds W in its first d_out rows (kept there by the caller); its last r
    rows are written here with A. -> (dx (..., d_in), dA, dB) as :func:`lowrank_backward` (the same
    dA, dB products). Where d_out < d_in this is cheaper than dY W followed by dx += dxa A (dx, the
    larger array, is written once; the copy of dY here is the smaller one): docs/performance.md.
    """
    xp = get_xp(dy)
    d_out, r, d_in = dy.shape[-1], A.shape[0], A.shape[1]
    dy2 = dy.reshape(-1, d_out)
    ys = xp.empty((dy2.shape[0], d_out + r), dtype=dy2.dtype)  # [dY | s·dY B]  (N, d_out + r)
    ys[:, :d_out] = dy2
    _, dA, dB = lowrank_backward(dy, cache, A, B, scale, need_dA=need_dA, need_dB=need_dB, need_dx=False,
                                 dxa_out=ys[:, d_out:])
    U[d_out:] = A
    dx = (ys @ U).reshape(*dy.shape[:-1], d_in)  # dY W + dxa A
    return dx, dA, dB
