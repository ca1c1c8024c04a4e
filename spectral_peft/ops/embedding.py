"""Embedding lookup: out = table[ids], and its backward, a scatter-add of the rows' gradients.

Shape legend: V vocabulary (rows of the table), C width, ids of any integer shape S (usually
(B, T)); out has shape S + (C,).

Forward:  out[s, :] = table[ids[s], :]
Backward: dtable[v, :] = Σ_{s : ids[s] = v} dout[s, :]     (a row used twice gets both gradients)

The gradient is accumulated by a scatter-add over the ids, never by a one-hot (N, V) matrix.
"""
from __future__ import annotations

from ..backend import get_xp, get_xpx, host_scalar


def _check_ids(ids, V: int) -> None:
    """Raise before any work if ``ids`` is not integer or holds a value outside [0, V)."""
    xp = get_xp(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be an integer array, got dtype {ids.dtype}")
    if ids.size == 0:
        return
    bad = (ids < 0) | (ids >= V)
    if host_scalar(bad.any(), "input check"):
        first = int(xp.argmax(bad.reshape(-1)))
        value = int(ids.reshape(-1)[first])
        raise ValueError(f"ids: token id {value} (flat position {first}) is outside [0, V) with V = {V}")


def embedding_forward(ids, table):
    """out = table[ids].  ids int S (e.g. (B, T)), table (V, C) -> out S + (C,).

    Raises ValueError naming the offending id and V if any id is outside [0, V).
    The cache holds the ids (and V): the table itself is a parameter, passed to no backward.
    """
    if table.ndim != 2:
        raise ValueError(f"table must have shape (V, C), got shape {tuple(table.shape)}")
    V = table.shape[0]
    _check_ids(ids, V)
    xp = get_xp(table)
    out = xp.take(table, ids, axis=0)  # S -> S + (C,)
    return out, (ids, V)


def embedding_backward(dout, cache, accumulate_into=None):
    """dtable (V, C) from dout S + (C,): rows with the same id sum their gradients.

    accumulate_into: an existing (V, C) gradient to add into in place (and return), touching only the
    rows of ids present: for a large vocabulary (GPT-2's 50257 rows) this avoids allocating, zeroing
    and adding a dense (V, C) array every step.

    NumPy: the tokens are sorted by id and each id's rows summed (a sort/bincount scatter-add run
    by scipy's CSR product; 10x faster than np.add.at here). CuPy: ``cupyx.scatter_add``.
    """
    ids, V = cache
    C = dout.shape[-1]
    if tuple(dout.shape) != tuple(ids.shape) + (C,):
        raise ValueError(f"dout must have shape ids.shape + (C,) = {tuple(ids.shape)} + (C,), got {tuple(dout.shape)}")
    if accumulate_into is not None and (tuple(accumulate_into.shape) != (V, C) or accumulate_into.dtype != dout.dtype):
        raise ValueError(f"accumulate_into must be a (V, C) = ({V}, {C}) array of dtype {dout.dtype}, "
                         f"got {tuple(accumulate_into.shape)} {accumulate_into.dtype}")
    xp = get_xp(dout)
    flat_ids = ids.reshape(-1)  # (N,)
    dout2 = dout.reshape(-1, C)  # (N, C)
    N = flat_ids.size
    xpx = get_xpx(xp)
    if xpx is not None:
        dtable = xp.zeros((V, C), dtype=dout.dtype) if accumulate_into is None else accumulate_into
        # out[s] = table[ids[s]]  =>  dtable[v] += dout[s] for every s with ids[s] = v
        xpx.scatter_add(dtable, flat_ids, dout2)
        return dtable
    import scipy.sparse  # noqa: PLC0415 - CPU path only

    # out[s] = table[ids[s]]  =>  dtable[v] = Σ_{ids[s] = v} dout[s]
    # Sorting the tokens by id groups each row's contributions together: row v's tokens are
    # order[start[v]:start[v+1]]. That grouping is exactly a CSR incidence matrix with N ones
    # (not a dense one-hot), and M · dout sums each group in scipy's compiled loop, in token
    # order: deterministic, no atomics.
    order = xp.argsort(flat_ids, kind="stable")  # (N,)
    ones = xp.ones(N, dtype=dout.dtype)
    if accumulate_into is None:
        start = xp.zeros(V + 1, dtype=xp.int64)
        xp.cumsum(xp.bincount(flat_ids, minlength=V), out=start[1:])  # (V + 1,)  start = cumsum(bincount(ids))
        M = scipy.sparse.csr_array((ones, order, start), shape=(V, N))
        return M @ dout2  # (V, N) · (N, C) -> (V, C)
    # only the U distinct ids present: a (U, N) incidence matrix, then U rows added in place
    sorted_ids = flat_ids[order]
    first = xp.flatnonzero(xp.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if N else xp.zeros(0, dtype=xp.int64)
    start = xp.append(first, N)  # (U + 1,)
    M = scipy.sparse.csr_array((ones, order, start), shape=(first.size, N))
    accumulate_into[sorted_ids[first]] += M @ dout2  # (U, N) · (N, C) -> (U, C); the ids are distinct
    return accumulate_into
