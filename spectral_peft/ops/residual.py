"""The residual connection and the fan-out rule of the backward.

Shape legend: x, fx, out, dout (...), all one shape (usually (B, T, C)).

Forward: out = x + fx, where fx = f(x) is a block's output (attention or MLP).
Backward: out = x + fx  =>  dx_direct = dout and dfx = dout: both branches receive dout unchanged.
Fan-out: where one activation x feeds two branches (the residual path and the block f), its total
gradient is the sum of what each branch sends back: dx = dout + (∂f/∂x)ᵀ dfx. That sum is
:func:`fanout_backward`.
"""
from __future__ import annotations


def residual_forward(x, fx):
    """out = x + fx.  x (...), fx (...) same shape -> out (...). Needs no cache."""
    if x.shape != fx.shape:
        raise ValueError(f"residual_forward: fx must have x's shape {tuple(x.shape)}, got {tuple(fx.shape)}")
    return x + fx


def residual_backward(dout):
    """out = x + fx  =>  (dx, dfx) = (dout, dout): the same array, passed to both branches."""
    return dout, dout


def fanout_backward(*dxs):
    """The gradient of an activation used by several branches: the sum of the branches' gradients.

    dxs: arrays of one shape (...), or None for a branch that sent nothing back -> a new array (...).
    The inputs are not modified.
    """
    present = [d for d in dxs if d is not None]
    if not present:
        raise ValueError("fanout_backward: needs at least one gradient, got none")
    shape = present[0].shape
    for i, d in enumerate(present[1:], start=1):
        if d.shape != shape:
            raise ValueError(f"fanout_backward: gradient {i} has shape {tuple(d.shape)}, expected {tuple(shape)}")
    total = present[0].copy() if len(present) == 1 else present[0] + present[1]
    for d in present[2:]:
        total += d
    return total
