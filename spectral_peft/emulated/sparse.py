"""``cupyx.scipy.sparse`` matrices on the emulated device: SciPy's, behind CuPy's rules.

A matrix is built from emulated device arrays only (a NumPy array raises TypeError), offers only
the attributes the installed ``cupyx.scipy.sparse`` class has, and its products with device
arrays give device arrays. Formats: csr_matrix, csc_matrix, coo_matrix (SciPy computes them).
"""
from __future__ import annotations

import numpy as np

from . import api
from .array import EmulatedArray, unwrap, wrap

_FORMATS = ("csr", "csc", "coo")


class EmulatedSparseMatrix:
    """One cupyx.scipy.sparse matrix over a private scipy.sparse matrix."""

    __array_priority__ = 101.0

    def __init__(self, m):
        self._m = m
        self.format = m.format
        if self.format not in _FORMATS:
            raise TypeError(f"gpu-emulated supports cupyx.scipy.sparse {_FORMATS}, got {self.format!r}")

    @property
    def _path(self) -> str:
        return f"cupyx.scipy.sparse.{self.format}_matrix"

    shape = property(lambda self: self._m.shape)
    dtype = property(lambda self: self._m.dtype)
    nnz = property(lambda self: self._m.nnz)
    ndim = property(lambda self: 2)

    @property
    def T(self):
        return EmulatedSparseMatrix(self._m.T)

    def __getattr__(self, name):
        if name.startswith("_") or not api.has(f"{self._path}.{name}"):
            raise AttributeError(f"'{self._path}' object has no attribute {name!r} (gpu-emulated mirrors the "
                                 "installed CuPy)")
        value = getattr(self._m, name)
        if not callable(value):
            return _wrap(value)
        path = f"{self._path}.{name}"

        def method(*args, **kwargs):
            api.check_keywords(path, kwargs)
            return _wrap(value(*unwrap(args, path), **unwrap(kwargs, path)))

        return method

    def __matmul__(self, other):
        return _wrap(self._m @ _operand(other, f"{self._path}.__matmul__"))

    def __rmatmul__(self, other):
        return _wrap(_operand(other, f"{self._path}.__rmatmul__") @ self._m)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (gpu-emulated cupyx.scipy.sparse)")


def _operand(x, where: str):
    if isinstance(x, EmulatedSparseMatrix):
        return x._m
    return unwrap(x, where)


def _wrap(r):
    import scipy.sparse  # noqa: PLC0415 - optional third-party, as in the engine's CPU path

    if scipy.sparse.issparse(r):
        return EmulatedSparseMatrix(r)
    return wrap(r)


def _matrix_class(fmt: str):
    path = f"cupyx.scipy.sparse.{fmt}_matrix"

    def make(arg1, shape=None, dtype=None, copy=False):
        import scipy.sparse  # noqa: PLC0415 - optional third-party, as in the engine's CPU path

        if isinstance(arg1, EmulatedSparseMatrix):
            inner = arg1._m
        elif isinstance(arg1, tuple):
            inner = unwrap(arg1, path)
        elif isinstance(arg1, EmulatedArray):
            inner = arg1._a
        else:
            raise TypeError(f"{path}: gpu-emulated takes device arrays, a tuple of them or a sparse matrix, got "
                            f"{type(arg1).__name__}" + (" (host data: move it with to_device first)"
                                                        if isinstance(arg1, np.ndarray) else ""))
        return EmulatedSparseMatrix(getattr(scipy.sparse, f"{fmt}_matrix")(inner, shape=shape, dtype=dtype,
                                                                           copy=copy))

    make.__name__ = f"{fmt}_matrix"
    return make


def _issparse(x) -> bool:
    return isinstance(x, EmulatedSparseMatrix)


SPARSE_OVERRIDES = {f"cupyx.scipy.sparse.{fmt}_matrix": _matrix_class(fmt) for fmt in _FORMATS}
SPARSE_OVERRIDES["cupyx.scipy.sparse.issparse"] = _issparse
