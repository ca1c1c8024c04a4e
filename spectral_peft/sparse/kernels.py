"""The three sparse products of RoSA, on NumPy/SciPy (CPU) and CuPy/cupyx (GPU).

Shape legend: N tokens (B·T flattened); S (d_out, d_in) in CSR with nnz entries (see csr.py);
x (N, d_in) layer input; dy (N, d_out) gradient of the layer output.

- ``sp_add(W, S)``       W + S                     (d_out, d_in)   the 'sp_add' forward/backward weight
- ``spmm(S, x)``         x Sᵀ                      (N, d_out)      the 'spmm' forward
- ``spmm_t(S, dy)``      dy S                      (N, d_in)       the 'spmm' input gradient
- ``sddmm(dy, x, S)``    (dyᵀ x)[rows, cols]       (nnz,)          the gradient of S's values

SDDMM ("sampled dense-dense matrix product") is the point of the sparse adapter's backward: the
gradient of the values is the dense weight gradient dyᵀx (d_out, d_in) read only on the support,
and it is computed without ever forming that dense product:

    dS_values[k] = Σ_n dy[n, rows[k]] · x[n, cols[k]]          k = 0 .. nnz-1

Three implementations, tested equal:

- :func:`sddmm` (canonical, readable): gather the needed columns of dy and x for a chunk of tokens,
  multiply, sum over tokens. Work nnz·N multiply-adds, memory O(chunk·nnz).
- :func:`sddmm_dense` (the peer and the reference): the dense product, then read the support.
- :func:`sddmm_planned` (fast, the default): a plan computed once per support (the support is
  fixed for the whole of training) covers the entries that cluster in rows or columns with dense
  blocks computed by BLAS (dy[:, R]ᵀ x[:, C], each at most half the matrix) and gathers the
  scattered rest (see :class:`SddmmPlan`). It never forms the dense product.
- :func:`sddmm_auto`: the same plan, or the dense product where the support is too dense for the
  plan to pay (choosing the path per density).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_xp, to_host, to_xp
from .csr import CSR

# Elements (tokens × entries) gathered per chunk by the canonical SDDMM: ~1 MiB of float32 per operand.
_GATHER_CHUNK = 1 << 18


# --- weight-shaped products ------------------------------------------------------------------------
def sp_add(W, S: CSR):
    """W + S: (d_out, d_in) dense plus (d_out, d_in) sparse -> a new dense (d_out, d_in) array."""
    if W.shape != S.shape:
        raise ValueError(f"sp_add: W has shape {W.shape} but S has shape {S.shape}")
    out = W.astype(W.dtype, copy=True)
    # the support has no duplicates, so a plain fancy-index += is exact
    out[S.rows, S.indices] += S.values
    return out


def spmm(S: CSR, x):
    """x Sᵀ: (..., d_in) -> (..., d_out), through scipy.sparse / cupyx.scipy.sparse."""
    d_out, d_in = S.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"spmm: x must be (..., {d_in}), got {x.shape}")
    x2 = x.reshape(-1, d_in)  # (N, d_in)
    yT = S.to_scipy() @ x2.T  # (d_out, d_in) @ (d_in, N) -> (d_out, N)
    return get_xp(x).ascontiguousarray(yT.T).reshape(*x.shape[:-1], d_out)


def spmm_t(S: CSR, dy):
    """dy S: (..., d_out) -> (..., d_in), the input gradient of y = x Sᵀ."""
    d_out, d_in = S.shape
    if dy.shape[-1] != d_out:
        raise ValueError(f"spmm_t: dy must be (..., {d_out}), got {dy.shape}")
    dy2 = dy.reshape(-1, d_out)  # (N, d_out)
    # y = x Sᵀ  =>  dX = dY S,  taken as (Sᵀ dYᵀ)ᵀ     (d_in, d_out) @ (d_out, N) -> (d_in, N)
    dxT = S.to_scipy().T @ dy2.T
    return get_xp(dy).ascontiguousarray(dxT.T).reshape(*dy.shape[:-1], d_in)


# --- SDDMM -------------------------------------------------------------------------------------------
def _check_sddmm(dy, x, S: CSR):
    if dy.ndim != 2 or x.ndim != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"sddmm: dy (N, d_out) and x (N, d_in) must share N, got {dy.shape} and {x.shape}")
    if (dy.shape[1], x.shape[1]) != S.shape:
        raise ValueError(f"sddmm: dy {dy.shape} and x {x.shape} do not fit the support's shape {S.shape}")


def _gather_dots(dy, x, rows, cols):
    """Σ_n dy[n, rows[k]] · x[n, cols[k]] for every k, gathering tokens in chunks. (nnz,)"""
    xp = get_xp(dy, x)
    N = dy.shape[0]
    k = int(rows.shape[0])
    out = xp.zeros(k, dtype=dy.dtype)
    if k == 0 or N == 0:
        return out
    chunk = max(1, _GATHER_CHUNK // k)
    for n0 in range(0, N, chunk):
        a = xp.take(dy[n0:n0 + chunk], rows, axis=1)  # (Nc, d_out) -> (Nc, nnz)
        b = xp.take(x[n0:n0 + chunk], cols, axis=1)  # (Nc, d_in) -> (Nc, nnz)
        a *= b
        out += a.sum(axis=0)  # Σ over the chunk's tokens
    return out


def sddmm(dy, x, S: CSR):
    """Canonical SDDMM: (dyᵀ x)[rows, cols] without the dense product.  dy (N, d_out), x (N, d_in)
    -> (nnz,) in S's row-major entry order."""
    _check_sddmm(dy, x, S)
    return _gather_dots(dy, x, S.rows, S.indices)


def sddmm_dense(dy, x, S: CSR):
    """Reference/peer: the dense weight gradient dyᵀ x (d_out, d_in), then read on the support."""
    _check_sddmm(dy, x, S)
    G = dy.T @ x  # (d_out, N) @ (N, d_in) -> (d_out, d_in)
    return G[S.rows, S.indices]


class SddmmPlan:
    """How :func:`sddmm_planned` computes one support, decided once from the support alone.

    Cost model, per token: a dense block of |R| rows × |C| columns costs |R|·|C| multiply-adds at
    BLAS speed; a gathered entry costs ``gather_cost`` multiply-adds' worth (two gathers, a
    multiply and a sum through memory: measured 120–230 on the 2-core CPU of PERFORMANCE.md, e.g.
    the dense product at d = 1024, N = 1024 took ≈ 9 ms and gathering 10⁴ entries × 1024 tokens
    ≈ 11 ms; 160 is used).

    1. Rows, by entry count descending: the prefix that saves most (:func:`_best_prefix`) forms
       block 1, those rows × the union of their columns.
    2. Columns of the entries left, the same way: block 2, the rows touching them × those columns.
    No block covers more than ``max_block_fraction`` of the matrix, so the plan never forms the
    dense (d_out, d_in) product.
    3. The rest is gathered. Only with ``dense_margin`` given (the 'auto' SDDMM), a plan costing
       more than dense_margin × the dense product computes the dense product instead
       (``use_dense``): choosing the path per density. Blocks and gathers run below
       the full product's BLAS speed.

    Gradient-chosen supports cluster in rows and columns (the rows and columns of large
    activations and gradients), so most of their entries land in the blocks; a uniformly random
    support has no heavy rows or columns and is gathered (or computed densely when that is cheaper).
    """

    def __init__(self, S: CSR, gather_cost: float = 160.0, dense_margin: float | None = None,
                 max_block_fraction: float = 0.5):
        xp = get_xp(S.values)
        d_out, d_in = S.shape
        rows = to_host(S.rows).astype(np.int64)
        cols = to_host(S.indices).astype(np.int64)
        nnz = rows.size
        self.blocks = []  # (rows R, cols C (None: all), entry ids, flat positions in the |R|×|C| block)
        todo = np.ones(nnz, dtype=bool)
        cost = 0.0
        # 1. heavy rows, then 2. heavy columns among the entries left
        for axis in (0, 1):
            rest = np.flatnonzero(todo)
            if rest.size == 0:
                break
            major, minor = (rows, cols) if axis == 0 else (cols, rows)
            chosen = _best_prefix(major[rest], minor[rest], gather_cost, max_block_fraction * d_out * d_in)
            if chosen.size:
                sel = rest[np.isin(major[rest], chosen)]
                cost += self._add_block(rows, cols, sel, S.shape, xp)
                todo[sel] = False
        # 3. the scattered rest
        rest = np.flatnonzero(todo)
        self.rest = to_xp(rest, xp)
        self.rest_rows = to_xp(rows[rest].astype(np.int32), xp)
        self.rest_cols = to_xp(cols[rest].astype(np.int32), xp)
        cost += gather_cost * rest.size
        self.cost = cost  # multiply-adds per token
        self.dense_cost = float(d_out * d_in)
        self.use_dense = dense_margin is not None and nnz > 0 and cost > dense_margin * self.dense_cost
        self.covered = 0.0 if nnz == 0 else 1.0 - rest.size / nnz

    def _add_block(self, rows, cols, entries, shape, xp) -> float:
        """Block of the entries ``entries``: their rows R × their columns C. When R or C spans
        nearly all of its dimension (>= 90 %), the whole dimension is used (stored as None), so the
        product reads dy or x directly instead of gathering them first."""
        r, c = rows[entries], cols[entries]
        R, r_inv = np.unique(r, return_inverse=True)
        C, c_inv = np.unique(c, return_inverse=True)
        R, r_inv = (None, r) if R.size >= 0.9 * shape[0] else (R, r_inv.reshape(-1))
        C, c_inv = (None, c) if C.size >= 0.9 * shape[1] else (C, c_inv.reshape(-1))
        n_r = shape[0] if R is None else R.size
        n_c = shape[1] if C is None else C.size
        flat = r_inv * n_c + c_inv
        self.blocks.append((None if R is None else to_xp(R, xp), None if C is None else to_xp(C, xp),
                            to_xp(entries, xp), to_xp(flat, xp)))
        return float(n_r * n_c)


def _best_prefix(major, minor, gather_cost: float, max_area: float):
    """The major indices (rows, or columns) to cover with one dense block.

    Taking major indices in order of entry count, descending, the prefix chosen is the one that
    saves most, gather_cost · (entries covered) − |prefix| · |union of their minor indices|, among
    those whose block |prefix| · |union| is at most ``max_area``. Returns the chosen major indices
    (possibly none).
    """
    ids, inverse, counts = np.unique(major, return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")  # major indices by entry count, descending
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    entry_rank = rank[inverse.reshape(-1)]  # the prefix length - 1 at which each entry is covered
    join = np.full(int(minor.max()) + 1, order.size)  # first prefix position using each minor index
    np.minimum.at(join, minor, entry_rank)
    union = np.cumsum(np.bincount(join[join < order.size], minlength=order.size))  # (n_major,)
    covered = np.cumsum(counts[order])
    area = np.arange(1, order.size + 1) * union
    saving = np.where(area <= max_area, gather_cost * covered - area, -np.inf)
    best = int(np.argmax(saving))
    if saving[best] <= 0:
        return ids[:0]
    return ids[order[:best + 1]]


def plan_for(S: CSR) -> SddmmPlan:
    """The SDDMM plan of S's support, built on first use and kept on the CSR object."""
    if S._plan is None:
        S._plan = SddmmPlan(S)
    return S._plan


def sddmm_planned(dy, x, S: CSR, plan: SddmmPlan | None = None):
    """Fast SDDMM (same result as :func:`sddmm`): dense blocks where the support clusters, gathers
    elsewhere, or the dense product when the support is too dense (see :class:`SddmmPlan`).
    dy (N, d_out), x (N, d_in) -> (nnz,)."""
    _check_sddmm(dy, x, S)
    plan = plan_for(S) if plan is None else plan
    if plan.use_dense:
        return sddmm_dense(dy, x, S)
    xp = get_xp(dy, x)
    out = xp.empty(S.nnz, dtype=dy.dtype)
    for R, C, entries, flat in plan.blocks:
        # block of the dense gradient:  dyᵀx[R][:, C] = dy[:, R]ᵀ x[:, C]   (|R|, N) @ (N, |C|)
        a = dy if R is None else xp.take(dy, R, axis=1)  # (N, |R|)
        b = x if C is None else xp.take(x, C, axis=1)  # (N, |C|)
        P = a.T @ b
        out[entries] = P.reshape(-1)[flat]
    if plan.rest.shape[0]:
        out[plan.rest] = _gather_dots(dy, x, plan.rest_rows, plan.rest_cols)
    return out


def sddmm_auto(dy, x, S: CSR):
    """The planned SDDMM, or the dense product where the support is too dense for the plan to pay
    (plan cost > 0.8 × the dense product's). The fastest choice; unlike 'planned' it forms the
    dense (d_out, d_in) product for dense supports. dy (N, d_out), x (N, d_in) -> (nnz,)."""
    if S._auto_plan is None:
        S._auto_plan = SddmmPlan(S, dense_margin=0.8)
    return sddmm_planned(dy, x, S, S._auto_plan)


SDDMM_IMPLS = {"planned": sddmm_planned, "auto": sddmm_auto, "gather": sddmm, "dense": sddmm_dense}
