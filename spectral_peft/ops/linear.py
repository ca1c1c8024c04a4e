"""Linear: y = x Wᵀ + b, the forward/backward pair every projection in the engine uses, and
:func:`matmul_add`, the in-place GEMM accumulation (out += α · a b) the low-rank branches add into
the base's output and input gradient with.

Shapes: x (N, d_in) or (..., d_in); W (d_out, d_in); b (d_out,); y (..., d_out).
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

_CBLAS: dict = {}  # dtype char -> NumPy's own cblas ?gemm (ctypes), or None where it cannot be found
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values


def _numpy_cblas_gemm(char: str):
    """The ILP64 cblas_sgemm of the OpenBLAS NumPy itself runs on (its wheels bundle it in
    numpy.libs), through ctypes, or None. NumPy's own library, not SciPy's: two OpenBLAS thread pools
    spinning side by side on 2 cores made every step several times slower (measured)."""
    # float32 only: float64 is the suite's reference precision, where host and device (CuPy, gpu-emulated)
    # runs are compared to 1e-12 and must take the same NumPy sequence (out += α·(a @ b))
    name = {"f": "sgemm"}.get(char)
    if name is None:
        return None
    libdir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(np.__file__))), "numpy.libs")
    real = ctypes.c_float
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)  # already loaded by NumPy: the same handle, the same thread pool
        except OSError:
            continue
        for sym in (f"scipy_cblas_{name}64_", f"cblas_{name}64_"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
                fn.argtypes = [i32, i32, i32, i64, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64]
                fn.restype = None
                return fn
    return None


def _cblas_gemm(dtype):
    char = np.dtype(dtype).char
    if char not in _CBLAS:
        _CBLAS[char] = _numpy_cblas_gemm(char)
    return _CBLAS[char]


def fast_gemm_available(dtype) -> bool:
    """Whether :func:`matmul_add` takes its one-gemm path for NumPy arrays of ``dtype``."""
    return _cblas_gemm(dtype) is not None


def _row_major_operand(m):
    """(array, CBLAS transpose flag, leading dimension) of a 2-D NumPy matrix for a row-major gemm,
    without a copy when its rows or its columns are contiguous."""
    isz = m.itemsize
    rows, cols = m.shape
    s0, s1 = m.strides
    if s1 == isz and s0 % isz == 0 and s0 // isz >= max(1, cols):
        return m, _NO_TRANS, s0 // isz
    if s0 == isz and s1 % isz == 0 and s1 // isz >= max(1, rows):
        return m, _TRANS, s1 // isz  # the row-major view of mᵀ
    m = np.ascontiguousarray(m)
    return m, _NO_TRANS, max(1, cols)


def matmul_add(out, a, b, alpha: float = 1.0):
    """out += α · (a @ b), in place; returns ``out``.  out (m, n), a (m, k), b (k, n).

    On NumPy float32 arrays whose rows are contiguous (``out`` may be a column slice of a wider
    array) this is ONE BLAS gemm with β = 1 written into ``out`` (NumPy's own OpenBLAS, see
    _numpy_cblas_gemm), so no (m, n) temporary exists; elsewhere (float64, CuPy, other BLAS builds)
    it is ``out += α · (a @ b)``, the sequence the device backends run. The two round differently only in where α is applied and in the
    gemm's summation order, within float tolerance.
    """
    gemm = None
    if isinstance(out, np.ndarray) and isinstance(a, np.ndarray) and isinstance(b, np.ndarray) \
            and a.dtype == out.dtype == b.dtype and out.ndim == a.ndim == b.ndim == 2:
        gemm = _cblas_gemm(out.dtype)
    isz = out.itemsize
    if gemm is None or out.size == 0 or out.strides[1] != isz or out.strides[0] % isz \
            or out.strides[0] // isz < out.shape[1] or not out.flags.writeable:
        prod = a @ b
        if alpha != 1.0:
            prod *= alpha
        out += prod
        return out
    m, n = out.shape
    k = a.shape[1]
    if a.shape != (m, k) or b.shape != (k, n):
        raise ValueError(f"matmul_add: out {out.shape}, a {a.shape}, b {b.shape} do not make out += a @ b")
    a, ta, lda = _row_major_operand(a)
    b, tb, ldb = _row_major_operand(b)
    gemm(_ROW_MAJOR, ta, tb, m, n, k, alpha, a.ctypes.data, lda, b.ctypes.data, ldb, 1.0, out.ctypes.data,
         out.strides[0] // isz)
    return out


def linear_forward(x, W, b=None, keep_x: bool = True, out=None):
    """y = x Wᵀ + b.  (..., d_in) -> (..., d_out). With ``out`` (..., d_out): y = out + x Wᵀ + b,
    accumulated into ``out`` (one gemm with β = 1, matmul_add) and ``out`` returned as y.

    The cache holds x only when ``keep_x`` (it is needed for dW alone; dX needs only W, which
    the caller passes to the backward: parameters are never counted as cached activations).
    """
    if out is not None:
        if out.shape != (*x.shape[:-1], W.shape[0]):
            raise ValueError(f"linear_forward: out must have shape {(*x.shape[:-1], W.shape[0])}, got {out.shape}")
        if out.flags.c_contiguous:
            matmul_add(out.reshape(-1, W.shape[0]), x.reshape(-1, x.shape[-1]), W.T)
        else:
            out += (x.reshape(-1, x.shape[-1]) @ W.T).reshape(out.shape)
        if b is not None:
            out += b
        return out, (x if keep_x else None, b is not None)
    # One GEMM over all tokens: NumPy runs a 3-D (B, T, d_in) @ 2-D product as B small ones (~4x slower).
    y = (x.reshape(-1, x.shape[-1]) @ W.T).reshape(*x.shape[:-1], W.shape[0])  # (N, d_in) -> (N, d_out)
    if b is not None:
        y += b
    return y, (x if keep_x else None, b is not None)


def linear_backward(dy, cache, W, need_dW: bool = True, need_dx: bool = True, need_db: bool = True,
                    dW_out=None):
    """Gradients of y = x Wᵀ + b: returns (dx, dW, db); each is None when not asked for/no bias.

    A frozen layer asks for dx alone (need_dW=False, need_db=False): one GEMM, no pass over dY for
    the bias sum. With ``dW_out`` (d_out, d_in) (the gradient accumulator), dW is added into it by
    one in-place gemm (matmul_add) and ``dW_out`` is returned as dW."""
    x, has_bias = cache
    d_out = dy.shape[-1]
    dy2 = dy.reshape(-1, d_out)  # (N, d_out)
    dW = db = dx = None
    if need_dW:
        if x is None:
            raise RuntimeError("linear_backward: dW was asked for but the forward did not keep x")
        # y = x Wᵀ  =>  dW = dYᵀ x     (d_out, N) @ (N, d_in) -> (d_out, d_in)
        x2 = x.reshape(-1, x.shape[-1])
        dW = dy2.T @ x2 if dW_out is None else matmul_add(dW_out, dy2.T, x2)
    if has_bias and need_db:
        # y = ... + b  =>  db = Σ_N dY
        db = dy2.sum(axis=0)
    if need_dx:
        # y = x Wᵀ  =>  dX = dY W     (..., d_out) @ (d_out, d_in) -> (..., d_in)
        dx = (dy2 @ W).reshape(*dy.shape[:-1], W.shape[1])
    return dx, dW, db
