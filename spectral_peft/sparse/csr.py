"""CSR storage of a sparse matrix S with a fixed support: the sparse half of RoSA.

Shape legend: S (d_out, d_in); nnz stored entries.

- ``values``  (nnz,)      float, the stored entries, row-major order (the trainable parameter);
- ``indptr``  (d_out+1,)  int32, row k holds entries indptr[k]:indptr[k+1] (peft-rosa: ``row_offs``);
- ``indices`` (nnz,)      int32, the column of each entry, ascending within a row (peft-rosa: ``col_idx``).

Derived once per support and kept (the support never changes while training):

- ``rows``    (nnz,)      int32, the row of each entry (COO view, used by SDDMM and sp_add);
- ``row_idx`` (d_out,)    int32, rows ordered by nnz descending (ties by row), the load-balancing
  order peft-rosa stores for its GPU kernels (source: IST-DASLab/peft-rosa ``splinear.py``,
  ``row_idx = argsort(-diff(row_offs))``); kept so adapter files carry the same arrays.

The same class serves NumPy (CPU) and CuPy (GPU); :meth:`CSR.to_scipy` hands the arrays to
``scipy.sparse`` or ``cupyx.scipy.sparse`` without copying them.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_xp, get_xpx, to_host, to_xp


class CSR:
    """A sparse (d_out, d_in) matrix in CSR form with a fixed support (see module docstring)."""

    def __init__(self, values, indptr, indices, shape: tuple[int, int]):
        xp = get_xp(values, indptr, indices)
        shape = (int(shape[0]), int(shape[1]))
        if values.ndim != 1 or indices.ndim != 1 or values.shape[0] != indices.shape[0]:
            raise ValueError(f"CSR values {values.shape} and indices {indices.shape} must both be (nnz,)")
        if indptr.shape != (shape[0] + 1,):
            raise ValueError(f"CSR indptr must have shape ({shape[0] + 1},) for {shape[0]} rows, got {indptr.shape}")
        indptr_h = to_host(indptr).astype(np.int64)
        indices_h = to_host(indices).astype(np.int64)
        if indptr_h[0] != 0 or indptr_h[-1] != values.shape[0] or np.any(np.diff(indptr_h) < 0):
            raise ValueError(f"CSR indptr must rise from 0 to nnz={values.shape[0]}, got "
                             f"first {indptr_h[0]}, last {indptr_h[-1]}")
        if indices_h.size and (indices_h.min() < 0 or indices_h.max() >= shape[1]):
            raise ValueError(f"CSR column indices must lie in [0, {shape[1]}), got "
                             f"[{indices_h.min()}, {indices_h.max()}]")
        rows_h = np.repeat(np.arange(shape[0], dtype=np.int64), np.diff(indptr_h))
        flat = rows_h * shape[1] + indices_h
        if flat.size > 1 and np.any(np.diff(flat) <= 0):
            raise ValueError("CSR column indices must be strictly increasing within each row (sorted, no duplicates)")
        self.values = values
        self.indptr = to_xp(indptr_h.astype(np.int32), xp)
        self.indices = to_xp(indices_h.astype(np.int32), xp)
        self.shape = shape
        self.rows = to_xp(rows_h.astype(np.int32), xp)
        counts = np.diff(indptr_h)
        # rows by nnz descending, ties by row index (a stable sort of -counts)
        self.row_idx = to_xp(np.argsort(-counts, kind="stable").astype(np.int32), xp)
        self._plan = None  # the SDDMM plans, built on first use (see kernels.SddmmPlan)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_mask(cls, mask, values=None, dtype=None) -> CSR:
        """The CSR of a boolean (d_out, d_in) ``mask``; values zero (of ``dtype``) unless given."""
        xp = get_xp(mask)
        if mask.ndim != 2:
            raise ValueError(f"a support mask must be 2-D (d_out, d_in), got shape {mask.shape}")
        m = to_host(mask).astype(bool)
        rows, cols = np.nonzero(m)  # row-major order, columns ascending within a row
        indptr = np.zeros(m.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=m.shape[0]), out=indptr[1:])
        if values is None:
            values = xp.zeros(rows.size, dtype=dtype or np.float64)
        return cls(values, to_xp(indptr, xp), to_xp(cols, xp), m.shape)

    # --- views ----------------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def with_values(self, values) -> CSR:
        """The same support with other values (shares every index array; no checks repeated)."""
        if values.shape != self.values.shape:
            raise ValueError(f"values must have shape {self.values.shape} (nnz,), got {values.shape}")
        new = object.__new__(CSR)
        new.__dict__.update(self.__dict__)
        new.values = values
        return new

    def mask(self):
        """Boolean (d_out, d_in) support."""
        xp = get_xp(self.values)
        m = xp.zeros(self.shape, dtype=bool)
        m[self.rows, self.indices] = True
        return m

    def to_dense(self):
        """Dense (d_out, d_in) matrix, zero off the support."""
        xp = get_xp(self.values)
        S = xp.zeros(self.shape, dtype=self.values.dtype)
        S[self.rows, self.indices] = self.values
        return S

    def to_scipy(self):
        """``scipy.sparse.csr_matrix`` (CPU) or ``cupyx.scipy.sparse.csr_matrix`` (GPU) over the
        same arrays (no copy)."""
        xpx = get_xpx(get_xp(self.values))
        if xpx is None:
            import scipy.sparse as sp  # noqa: PLC0415
        else:
            sp = xpx.scipy.sparse
        return sp.csr_matrix((self.values, self.indices, self.indptr), shape=self.shape, copy=False)

    def row_counts(self):
        """(d_out,) nnz per row."""
        return self.indptr[1:] - self.indptr[:-1]
