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

Implementations, tested equal:

- :func:`sddmm` (canonical, readable): gather the needed columns of dy and x for a chunk of tokens,
  multiply, sum over tokens. Work nnz·N multiply-adds, memory O(chunk·nnz).
- :func:`sddmm_dense` (the peer and the reference): the dense product, then read the support.
- :func:`sddmm_planned` (fast, the default): a plan computed once per support (the support is
  fixed for the whole of training) picks one of three paths by a measured cost model
  (see :class:`SddmmPlan`): dense blocks computed by BLAS where the entries cluster in rows or
  columns (dy[:, R]ᵀ x[:, C], each at most half the matrix) with the scattered rest gathered; every
  entry gathered (rows of the transposed operands); or the dense product, where the support has
  too little structure for the others to pay, so that it is never slower than the dense product.
- :func:`sddmm_auto`: the same (the name of ``sddmm_impl='auto'``).
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


# Relative costs of the SDDMM paths, in dense multiply-adds per token (the dense product dyᵀx costs
# d_out·d_in of them). Measured on the 2-core CPU of docs/performance.md, float32, d = N = 1024,
# where the dense product runs at ≈ 97 multiply-adds/ns (≈ 11 ms):
#   np.take(dy, R, axis=1), one column for a block         ≈ 0.6 ns per element  -> 60
#   a tiled transpose, per element of the columns it moves  ≈ 1.1 ns             -> 110
#   a gathered entry, rows of the transposed operands       ≈ 0.41 ns per token  -> 40
#   a gathered entry, chunks of tokens (the canonical way)  ≈ 2 ns per token     -> 200
#   one block's fixed cost (Python, takes, BLAS set-up, the scatter of its entries): a 20 × 83
#   block took ≈ 0.1 ms beyond its multiply-adds and column takes  -> 10000 per token at N ≈ 1024
# Those are NumPy's single-threaded passes against a 2-thread BLAS: with t BLAS threads a dense
# multiply-add costs 2/t times as much, so the plan scales them by t/2 (t from threadpoolctl).
COST_BLAS_THREADS = 2
COLUMN_COST = 60.0
BLOCK_COST = 10000.0
TRANSPOSE_COST = 110.0
GATHER_COST = 40.0
CHUNK_GATHER_COST = 200.0
PLAN_PATHS = ("auto", "dense", "blocked", "gather")


class SddmmPlan:
    """How :func:`sddmm_planned` computes one support, decided once from the support alone.

    Three paths, each tested equal to the masked dense product:

    - ``dense``: dyᵀx (d_out, d_in) by BLAS, then read on the support (one flat take); on NumPy
      the product goes into a (d_out, d_in) workspace the plan keeps between calls.
    - ``blocked``: dense blocks where the support clusters in rows or columns (dy[:, R]ᵀ x[:, C],
      each at most ``max_block_fraction`` of the matrix), the scattered rest gathered:
      1. rows, by entry count descending: the prefix that saves most (:func:`_best_prefix`) forms
         block 1, those rows × the union of their columns;
      2. columns of the entries left, the same way: block 2, the rows touching them × those columns;
      3. the rest is gathered.
    - ``gather``: every entry gathered.

    A gather (of the rest, or of everything) runs one of two ways, whichever the cost model says is
    cheaper: on the transposed operands, dyᵀ[rows] and xᵀ[cols] (contiguous rows of N tokens; the
    needed columns of dy and x are transposed once per call), or the canonical token chunks of
    :func:`_gather_dots` (no transpose; dearer per entry, cheaper for a handful of entries).

    With ``path="auto"`` (the default) the path is the cheapest by the cost model above (dense
    multiply-adds per token; the constants are measured, see COLUMN_COST ..., and scaled by the
    number of BLAS threads at plan time): ``dense`` is taken
    whenever the cheapest of the others costs more than ``dense_margin`` × the dense product, so the
    planned SDDMM is not slower than the dense product on supports with no structure (uniformly
    random ones above ≈ 2 %), and much faster on the clustered, gradient-chosen supports RoSA trains.
    ``dense_margin=None`` never takes the dense path (the (d_out, d_in) product is never formed).
    """

    def __init__(self, S: CSR, path: str = "auto", dense_margin: float | None = 1.0,
                 max_block_fraction: float = 0.5, gather_cost: float = GATHER_COST,
                 chunk_gather_cost: float = CHUNK_GATHER_COST, column_cost: float = COLUMN_COST,
                 transpose_cost: float = TRANSPOSE_COST, block_cost: float = BLOCK_COST,
                 rest_method: str | None = None):
        if path not in PLAN_PATHS:
            raise ValueError(f"SddmmPlan: path must be one of {PLAN_PATHS}, got {path!r}")
        if rest_method not in (None, "transposed", "chunked"):
            raise ValueError(f"SddmmPlan: rest_method must be None, 'transposed' or 'chunked', got {rest_method!r}")
        xp = get_xp(S.values)
        d_out, d_in = S.shape
        if xp is np:  # the non-BLAS costs, in multiply-adds of this host's BLAS
            f = blas_thread_count() / COST_BLAS_THREADS
            gather_cost, chunk_gather_cost, column_cost, transpose_cost, block_cost = (
                f * gather_cost, f * chunk_gather_cost, f * column_cost, f * transpose_cost, f * block_cost)
        rows = to_host(S.rows).astype(np.int64)
        cols = to_host(S.indices).astype(np.int64)
        nnz = rows.size
        self.shape = (d_out, d_in)
        self._consts = dict(gather=gather_cost, chunk=chunk_gather_cost, column=column_cost, transpose=transpose_cost,
                            block=block_cost)
        self._rest_method = rest_method
        self.dense_cost = float(d_out * d_in)
        self.workspace = None  # the dense path's (d_out, d_in) product, kept between calls (NumPy)
        self.flat = to_xp(rows * d_in + cols, xp)  # (nnz,) positions in the row-major dense product
        # the blocked candidate: heavy rows, then heavy columns among the entries left, then the rest
        blocks, todo, block_cost = [], np.ones(nnz, dtype=bool), 0.0
        eff_gather = min(gather_cost, chunk_gather_cost)  # what covering an entry by a block saves at most
        for axis in (0, 1):
            rest = np.flatnonzero(todo)
            if rest.size == 0:
                break
            major, minor = (rows, cols) if axis == 0 else (cols, rows)
            chosen = _best_prefix(major[rest], minor[rest], eff_gather, max_block_fraction * d_out * d_in)
            if chosen.size:
                sel = rest[np.isin(major[rest], chosen)]
                block, cost = self._block(rows, cols, sel, xp)
                blocks.append(block)
                block_cost += cost
                todo[sel] = False
        blocked_rest = np.flatnonzero(todo)
        blocked_cost = block_cost + self._gather_cost(rows[blocked_rest], cols[blocked_rest])[0]
        gather_all_cost = self._gather_cost(rows, cols)[0]
        if path == "auto":
            cheapest = "blocked" if blocked_cost <= gather_all_cost else "gather"
            best = min(blocked_cost, gather_all_cost)
            if dense_margin is not None and nnz > 0 and best > dense_margin * self.dense_cost:
                cheapest = "dense"
            path = cheapest
        self.path = path
        self.use_dense = path == "dense"
        if path == "blocked":
            self.blocks, rest = blocks, blocked_rest
            self.cost = blocked_cost
        elif path == "gather":
            self.blocks, rest = [], np.arange(nnz)
            self.cost = gather_all_cost
        else:
            self.blocks, rest = [], np.arange(0)
            self.cost = self.dense_cost
        self.covered = 0.0 if nnz == 0 else 1.0 - rest.size / nnz  # the share of entries not gathered
        self.rest = to_xp(rest, xp)
        self.rest_rows = to_xp(rows[rest].astype(np.int32), xp)
        self.rest_cols = to_xp(cols[rest].astype(np.int32), xp)
        # the transposed gather: the distinct rows / columns of the rest (None: all of them), and
        # each entry's position among them
        _, self.rest_method, R, r_local, C, c_local = self._gather_cost(rows[rest], cols[rest])
        self.rest_R, self.rest_C = (None if R is None else to_xp(R, xp)), (None if C is None else to_xp(C, xp))
        self.rest_r_local, self.rest_c_local = to_xp(r_local, xp), to_xp(c_local, xp)

    def _gather_cost(self, r, c):
        """(cost, method, R, r_local, C, c_local): the cheaper way to gather the entries (r, c)."""
        k = self._consts
        if r.size == 0:
            return 0.0, "chunked", None, r, None, c
        d_out, d_in = self.shape
        R, r_local = np.unique(r, return_inverse=True)
        C, c_local = np.unique(c, return_inverse=True)
        # transposing all of a dimension skips the column take first
        t_r = k["transpose"] * d_out if R.size >= 0.9 * d_out else (k["transpose"] + k["column"]) * R.size
        t_c = k["transpose"] * d_in if C.size >= 0.9 * d_in else (k["transpose"] + k["column"]) * C.size
        transposed = k["gather"] * r.size + t_r + t_c
        chunked = k["chunk"] * r.size
        method = self._rest_method or ("transposed" if transposed < chunked else "chunked")
        if R.size >= 0.9 * d_out:
            R, r_local = None, r
        if C.size >= 0.9 * d_in:
            C, c_local = None, c
        return (transposed if method == "transposed" else chunked), method, R, r_local.reshape(-1), C, c_local.reshape(-1)

    def _block(self, rows, cols, entries, xp):
        """Block of the entries ``entries``: their rows R × their columns C, and its cost per token.
        When R or C spans nearly all of its dimension (>= 90 %), the whole dimension is used (stored
        as None), so the product reads dy or x directly instead of taking its columns first."""
        shape = self.shape
        r, c = rows[entries], cols[entries]
        R, r_inv = np.unique(r, return_inverse=True)
        C, c_inv = np.unique(c, return_inverse=True)
        R, r_inv = (None, r) if R.size >= 0.9 * shape[0] else (R, r_inv.reshape(-1))
        C, c_inv = (None, c) if C.size >= 0.9 * shape[1] else (C, c_inv.reshape(-1))
        n_r = shape[0] if R is None else R.size
        n_c = shape[1] if C is None else C.size
        flat = r_inv * n_c + c_inv
        cost = self._consts["block"] + float(n_r * n_c) + self._consts["column"] * ((0 if R is None else n_r) + (0 if C is None else n_c))
        block = (None if R is None else to_xp(R, xp), None if C is None else to_xp(C, xp),
                 to_xp(entries, xp), to_xp(flat, xp))
        return block, cost


def blas_thread_count() -> int:
    """The threads of NumPy's BLAS now (threadpoolctl), 1 when it reports none."""
    from threadpoolctl import threadpool_info  # noqa: PLC0415

    counts = [int(i.get("num_threads") or 1) for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts, default=1)


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


def _transpose(a):
    """a (N, k) -> aᵀ (k, N), C-contiguous. On NumPy in strips of one cache line of rows (64 bytes
    of each output row per copy): ≈ 3.5× faster than ``np.ascontiguousarray(a.T)`` at 1024 × 1024."""
    xp = get_xp(a)
    if xp is not np:
        return xp.ascontiguousarray(a.T)
    n, k = a.shape
    out = np.empty((k, n), dtype=a.dtype)
    b = max(1, 64 // a.itemsize)
    for i in range(0, n, b):
        out[:, i:i + b] = a[i:i + b].T
    return out


def _transposed_columns(a, idx):
    """a[:, idx]ᵀ (|idx|, N) contiguous, or aᵀ (k, N) when idx is None."""
    return _transpose(a if idx is None else get_xp(a).take(a, idx, axis=1))


# Entries gathered per chunk by the transposed gather: 256 rows of N tokens per operand.
_ENTRY_CHUNK = 256


def _gather_dots_t(dyT, xT, r_local, c_local):
    """Σ_n dyT[r_local[k], n] · xT[c_local[k], n] for every k, in chunks of entries. (k,)

    dyT (|R|, N), xT (|C|, N): the transposed needed columns of dy and x."""
    xp = get_xp(dyT, xT)
    k = int(r_local.shape[0])
    out = xp.empty(k, dtype=dyT.dtype)
    for a in range(0, k, _ENTRY_CHUNK):
        A = xp.take(dyT, r_local[a:a + _ENTRY_CHUNK], axis=0)  # (chunk, N): contiguous rows
        B = xp.take(xT, c_local[a:a + _ENTRY_CHUNK], axis=0)  # (chunk, N)
        out[a:a + _ENTRY_CHUNK] = xp.einsum("kn,kn->k", A, B)  # Σ over tokens, no (chunk, N) product kept
    return out


def plan_for(S: CSR) -> SddmmPlan:
    """The SDDMM plan of S's support, built on first use and kept on the CSR object."""
    if S._plan is None:
        S._plan = SddmmPlan(S)
    return S._plan


def sddmm_planned(dy, x, S: CSR, plan: SddmmPlan | None = None):
    """Fast SDDMM (same result as :func:`sddmm`): the path of the support's plan, dense, blocked or
    gathered (see :class:`SddmmPlan`). dy (N, d_out), x (N, d_in) -> (nnz,)."""
    _check_sddmm(dy, x, S)
    plan = plan_for(S) if plan is None else plan
    xp = get_xp(dy, x)
    if plan.use_dense:
        # (d_out, N) @ (N, d_in) -> (d_out, d_in), the dense weight gradient; on NumPy into a
        # workspace the plan keeps (a fresh 4 MiB array per call costs its page faults, ≈ 3 % of
        # the product at d = 1024)
        if xp is np:
            ws, dtype = plan.workspace, np.result_type(dy, x)
            if ws is None or ws.dtype != dtype:
                ws = plan.workspace = np.empty(S.shape, dtype=dtype)
            G = np.matmul(dy.T, x, out=ws)
        else:
            G = dy.T @ x
        return xp.take(G.reshape(-1), plan.flat)  # read on the support, row-major entry order
    out = xp.empty(S.nnz, dtype=dy.dtype)
    for R, C, entries, flat in plan.blocks:
        # block of the dense gradient:  dyᵀx[R][:, C] = dy[:, R]ᵀ x[:, C]   (|R|, N) @ (N, |C|)
        a = dy if R is None else xp.take(dy, R, axis=1)  # (N, |R|)
        b = x if C is None else xp.take(x, C, axis=1)  # (N, |C|)
        P = a.T @ b
        out[entries] = P.reshape(-1)[flat]
    if plan.rest.shape[0]:
        if plan.rest_method == "transposed":
            # dS[k] = Σ_n dy[n, r_k] x[n, c_k] = dyᵀ[r_k] · xᵀ[c_k], on contiguous rows of N tokens
            out[plan.rest] = _gather_dots_t(_transposed_columns(dy, plan.rest_R), _transposed_columns(x, plan.rest_C),
                                            plan.rest_r_local, plan.rest_c_local)
        else:
            out[plan.rest] = _gather_dots(dy, x, plan.rest_rows, plan.rest_cols)
    return out


def sddmm_auto(dy, x, S: CSR):
    """The same as :func:`sddmm_planned` (whose plan already takes the dense product where the
    support is too dense for the others to pay); kept as the name of ``sddmm_impl='auto'``.
    dy (N, d_out), x (N, d_in) -> (nnz,)."""
    return sddmm_planned(dy, x, S)


SDDMM_IMPLS = {"planned": sddmm_planned, "auto": sddmm_auto, "gather": sddmm, "dense": sddmm_dense}
