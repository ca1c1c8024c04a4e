"""Cross-entropy of logits against integer targets, mean over non-ignored targets (HF semantics).

Shape legend: N tokens (B·T), V vocabulary; logits (N, V), targets (N,) int, E (N, V).

Forward:  L = (1/n) Σ_{i : t_i ≠ ignore} (logsumexp(z_i) - z_{i, t_i}),  n = #non-ignored
          (n = 0: L = 0 and a zero gradient, not NaN; PyTorch would give NaN there)
Backward: dz_i = dL · (softmax(z_i) - onehot(t_i)) / n for non-ignored rows, 0 for ignored rows.

The cache holds E = e^(z - max z) (N, V), which the forward computes anyway, and its row sums; the
backward turns E into dlogits IN PLACE, normalising and scaling in the same pass (no second (N, V)
array: with V = 50257 that is GPT-2's largest activation), so the cache is consumed: a second
backward on the same cache raises.
"""
from __future__ import annotations

from ..backend import get_xp, host_scalar


def cross_entropy_forward(logits, targets, ignore_index: int = -100):
    """Mean cross-entropy.  logits (N, V) float, targets (N,) int -> (loss: float, cache).

    Targets must lie in [0, V) or equal ``ignore_index``; otherwise ValueError, before any work.
    """
    if logits.ndim != 2 or logits.dtype.kind != "f":
        raise ValueError(f"cross_entropy_forward: logits must be a float array of shape (N, V), got shape {tuple(logits.shape)} dtype {logits.dtype}")
    N, V = logits.shape
    if tuple(targets.shape) != (N,):
        raise ValueError(f"cross_entropy_forward: targets must have shape (N,) = ({N},), got {tuple(targets.shape)}")
    if targets.dtype.kind not in "iu":
        raise ValueError(f"cross_entropy_forward: targets must be integer, got dtype {targets.dtype}")
    xp = get_xp(logits)
    valid = targets != ignore_index  # (N,) bool
    bad = valid & ((targets < 0) | (targets >= V))
    if host_scalar(bad.any(), "input check"):
        i = int(xp.argmax(bad))
        raise ValueError(f"cross_entropy_forward: targets[{i}] = {int(targets[i])} is outside [0, V) with V = {V} "
                         f"and is not ignore_index = {ignore_index}")
    n = host_scalar(valid.sum(), "loss")
    rows = xp.arange(N)
    safe_t = xp.where(valid, targets, 0)  # (N,) an in-range index even on ignored rows
    m = logits.max(axis=-1, keepdims=True)  # (N, 1)
    E = logits - m  # (N, V)
    xp.exp(E, out=E)  # E = e^(z - m); softmax(z) = E / denom, normalised only in the backward
    denom = E @ xp.ones(V, dtype=E.dtype)  # (N,)  row sums as a BLAS gemv
    # logsumexp(z_i) - z_{i, t_i} = log Σ e^(z - m) - (z_{i, t_i} - m)
    nll = xp.log(denom) - (logits[rows, safe_t] - m[:, 0])  # (N,)
    loss = float(host_scalar((nll * valid).sum(), "loss")) / n if n else 0.0
    return loss, [E, denom, safe_t, valid, n]


def cross_entropy_backward(dloss, cache):
    """dlogits (N, V) of the mean cross-entropy, scaled by the upstream scalar ``dloss``.

    Consumes the cache: dlogits is written over the cached exponentials.
    """
    E, denom, safe_t, valid, n = cache
    if E is None:
        raise RuntimeError("cross_entropy_backward: this cache was already consumed by a backward")
    cache[0] = None
    xp = get_xp(E)
    dz = E
    if n == 0:
        dz[...] = 0.0
        return dz
    # L = (1/n) Σ_valid (logsumexp(z_i) - z_{i,t_i})  =>  dz_i = [i valid] · (softmax(z_i) - onehot(t_i)) · dL / n
    w = valid * (float(dloss) / n)  # (N,) the row weights, 0 on ignored rows
    w = w.astype(E.dtype, copy=False)
    dz *= (w / denom)[:, None]  # softmax(z_i) · w_i in one pass: E_i / denom_i · w_i
    dz[xp.arange(dz.shape[0]), safe_t] -= w
    return dz
