"""The element-wise ops with fewer passes over memory, against their canonical expressions.

Each expected value is the textbook formula written here in plain NumPy (means and sums by
``.mean``/``.sum``, no BLAS tricks), never the code under test. Where the op keeps the canonical
order of operations the comparison is bit-exact (dropout); where a sum runs in another order (a
BLAS gemv or a row-wise einsum instead of ``.sum``) the tolerance is stated: float64 rtol 1e-12,
float32 rtol 1e-5, both with an absolute floor of rtol × the largest |expected| (cancellation in
dx = r (g - mean(g) - ...) leaves entries near 0 whose relative error is meaningless).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.ops import (dropout_backward, dropout_forward, gelu_backward, gelu_forward, layernorm_backward,
                               layernorm_forward, rmsnorm_backward, rmsnorm_forward, softmax_backward,
                               softmax_forward)
from spectral_peft.ops.activation import swiglu_backward, swiglu_forward
from spectral_peft.testing import assert_close

RTOL = {np.float64: 1e-12, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


def close(got, expected, name, dtype):
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype.__name__}"
    rtol = RTOL[dtype]
    assert_close(got, expected, name, rtol=rtol, atol=rtol * max(1.0, float(np.abs(expected).max(initial=0.0))))


shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 40))


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_backward_equals_canonical(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    x, dy = (rng.standard_normal(shape) * 3 + 1).astype(dtype), rng.standard_normal(shape).astype(dtype)
    w, b = rng.standard_normal(shape[-1]).astype(dtype), rng.standard_normal(shape[-1]).astype(dtype)
    _, cache = layernorm_forward(x, w, b, 1e-5)
    dx, dw, db = layernorm_backward(dy, cache, w)
    x64, dy64, w64 = x.astype(np.float64), dy.astype(np.float64), w.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    r = 1.0 / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    xhat = (x64 - mu) * r
    g = dy64 * w64
    # dx is a difference of terms as large as r·|g|·(2 + |x̂|), which cancel (exactly, at C = 2):
    # the float32 rounding of those terms is the absolute floor
    terms = float(np.abs(r).max() * np.abs(g).max() * (2 + np.abs(xhat).max()))
    assert_close(dx, r * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True)), "dx",
                 rtol=RTOL[dtype], atol=RTOL[dtype] * max(1.0, terms))
    assert dx.dtype == dtype
    close(dw, (dy64 * xhat).reshape(-1, shape[-1]).sum(0), "dweight", dtype)
    close(db, dy64.reshape(-1, shape[-1]).sum(0), "dbias", dtype)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_backward_equals_canonical(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(shape[-1]).astype(dtype)
    _, cache = rmsnorm_forward(x, w, 1e-6)
    dx, dw = rmsnorm_backward(dy, cache, w)
    x64, dy64, w64 = x.astype(np.float64), dy.astype(np.float64), w.astype(np.float64)
    r = 1.0 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
    xhat = x64 * r
    g = dy64 * w64
    terms = float(np.abs(r).max() * np.abs(g).max() * (1 + np.abs(xhat).max()))  # as for LayerNorm
    assert_close(dx, r * (g - xhat * (g * xhat).mean(-1, keepdims=True)), "dx", rtol=RTOL[dtype],
                 atol=RTOL[dtype] * max(1.0, terms))
    assert dx.dtype == dtype
    close(dw, (dy64 * xhat).reshape(-1, shape[-1]).sum(0), "dweight", dtype)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), axis=st.sampled_from([-1, 0, 1]))
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_equals_canonical(dtype, shape, seed, axis):
    rng = np.random.default_rng(seed)
    x, dy = (rng.standard_normal(shape) * 4).astype(dtype), rng.standard_normal(shape).astype(dtype)
    y, cache = softmax_forward(x, axis)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    e = np.exp(x64 - x64.max(axis, keepdims=True))
    y_ref = e / e.sum(axis, keepdims=True)
    close(y, y_ref, f"softmax axis {axis}", dtype)
    close(softmax_backward(dy, cache), y_ref * (dy64 - (dy64 * y_ref).sum(axis, keepdims=True)),
          f"softmax backward axis {axis}", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_is_bit_identical_to_canonical(dtype, p):
    """Same order of operations as y = (x · 1/(1-p)) ⊙ [u >= p], u the generator's uniforms: bit-exact."""
    x = np.random.default_rng(1).standard_normal((4, 33, 17)).astype(dtype)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(dtype)
    y, cache = dropout_forward(x, p, np.random.default_rng(7), True)
    keep = np.random.default_rng(7).random(x.shape, dtype=dtype) >= p
    scale = 1.0 / (1.0 - p)
    np.testing.assert_array_equal(cache[0], keep)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, (x * scale) * keep)
    np.testing.assert_array_equal(dropout_backward(dy, cache), (dy * scale) * keep)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_backward_equals_canonical(dtype, shape, seed):
    """dx = dy (s + x s'), s = ½(1 + tanh(k(x + c x³))), s' = 2 s (1 - s) k (1 + 3c x²), in float64."""
    rng = np.random.default_rng(seed)
    x, dy = (rng.standard_normal(shape) * 3).astype(dtype), rng.standard_normal(shape).astype(dtype)
    _, cache = gelu_forward(x, "tanh")
    x64, k, c = x.astype(np.float64), np.sqrt(2 / np.pi), 0.044715
    s = 0.5 * (1 + np.tanh(k * (x64 + c * x64 ** 3)))
    ds = 2 * s * (1 - s) * k * (1 + 3 * c * x64 ** 2)
    close(gelu_backward(dy, cache), dy.astype(np.float64) * (s + x64 * ds), "gelu_tanh backward", dtype)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_backward_equals_canonical(dtype, shape, seed):
    """y = g σ(g) u: du = dy g σ(g), dg = dy u (σ + g σ (1 - σ)), σ = 1/(1 + e^-g), in float64."""
    rng = np.random.default_rng(seed)
    g, u, dy = ((rng.standard_normal(shape) * 3).astype(dtype) for _ in range(3))
    _, cache = swiglu_forward(g, u)
    dg, du = swiglu_backward(dy, cache)
    g64, u64, dy64 = g.astype(np.float64), u.astype(np.float64), dy.astype(np.float64)
    sig = 1.0 / (1.0 + np.exp(-g64))
    close(du, dy64 * g64 * sig, "swiglu dup", dtype)
    close(dg, dy64 * u64 * (sig + g64 * sig * (1 - sig)), "swiglu dgate", dtype)
