"""Comparison and gradient-check helpers shared by the tests, `validate` and the benchmarks.

Tolerance convention (stated once, used everywhere): an array ``actual`` matches ``expected``
when every element satisfies ``|actual - expected| <= atol + rtol * |expected|``. When ``atol`` is
not given it is ``rtol * max|expected|``, i.e. errors are judged relative to the tensor's scale,
so an entry that happens to be near zero does not demand impossible relative accuracy.
A failing comparison names the tensor and prints its max abs and max rel error.

Tolerances per dtype used across the suite (see docs/testing.md):
    float64 vs an independent float64 implementation:   rtol 1e-10
    float32 vs an independent float32 implementation:   rtol 1e-4
    float64 central differences (eps ~ 1e-6):           rtol 1e-6
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .backend import to_host

RTOL = {"float64": 1e-10, "float32": 1e-4}
GRADCHECK_RTOL = 1e-6


def errors(actual, expected) -> tuple[float, float]:
    """(max abs error, max rel error) where rel = |a - e| / max(|e|, tiny)."""
    a = np.asarray(to_host(actual), dtype=np.float64)
    e = np.asarray(to_host(expected), dtype=np.float64)
    if a.size == 0:
        return 0.0, 0.0
    diff = np.abs(a - e)
    rel = diff / np.maximum(np.abs(e), np.finfo(np.float64).tiny)
    return float(diff.max()), float(rel.max())


def assert_close(actual, expected, name: str, rtol: float, atol: float | None = None,
                 equal_nan: bool = False) -> None:
    """Assert |actual - expected| <= atol + rtol·|expected| elementwise (see module docstring).

    A non-finite element (NaN, ±inf) in either array fails, even where both hold the same one:
    two NaNs agree on nothing. A caller that expects non-finite values passes ``equal_nan=True``;
    then NaN must meet NaN and ±inf the same ±inf, element for element, and the finite rest is
    compared as usual.
    """
    a = np.asarray(to_host(actual), dtype=np.float64)
    e = np.asarray(to_host(expected), dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
    finite_a, finite_e = np.isfinite(a), np.isfinite(e)
    if not (finite_a.all() and finite_e.all()):
        if not equal_nan:
            raise AssertionError(f"{name}: {int((~finite_a).sum())} non-finite value(s) in actual, "
                                 f"{int((~finite_e).sum())} in expected (pass equal_nan=True to compare them)")
        same = np.array_equal(finite_a, finite_e) and np.array_equal(np.isnan(a), np.isnan(e)) \
            and np.array_equal(a[np.isinf(e)], e[np.isinf(e)])
        if not same:
            raise AssertionError(f"{name}: non-finite values differ from expected")
    finite = finite_e
    scale = float(np.max(np.abs(e[finite]))) if finite.any() else 0.0
    if atol is None:
        atol = rtol * scale
    ok = np.abs(a[finite] - e[finite]) <= atol + rtol * np.abs(e[finite])
    if not np.all(ok):
        max_abs, max_rel = errors(a[finite], e[finite])
        raise AssertionError(
            f"{name}: max abs error {max_abs:.3e}, max rel error {max_rel:.3e} "
            f"(rtol {rtol:g}, atol {atol:.3e}, scale {scale:.3e}, {int((~ok).sum())}/{ok.size} elements off)"
        )


def numerical_gradient(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to the float64 array ``x`` (perturbed in
    place and restored): (f(x + eps·e_i) - f(x - eps·e_i)) / (2 eps) for every element i."""
    if x.dtype != np.float64:
        raise TypeError(f"numerical_gradient needs a float64 array, got {x.dtype}")
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    gflat = grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return grad


def check_module_gradients(module, inputs: list, seed: int = 0, rtol: float = GRADCHECK_RTOL,
                           eps: float = 1e-6, input_names: list[str] | None = None,
                           check_inputs: bool = True) -> None:
    """Float64 gradient check of a Module on the CPU backend.

    The scalar checked is L = Σ forward(*inputs) ⊙ G for a fixed random G, so backward(G) must
    give dL/d(parameter) for every trainable parameter and dL/d(input) for every float input.
    Frozen parameters must get no gradient. Inputs must not be mutated.
    """
    rng = np.random.default_rng(seed)
    originals = [np.array(x, copy=True) for x in inputs]
    out = module.forward(*inputs)
    G = rng.standard_normal(out.shape)
    module.zero_grad()
    dx = module.backward(G.copy())
    for i, (x, x0) in enumerate(zip(inputs, originals)):
        if not np.array_equal(x, x0):
            raise AssertionError(f"input {i} was mutated by forward/backward")
    analytic = {name: np.array(m.grads[k]) for name, m, k in module.named_parameters(trainable_only=True)}

    def loss() -> float:
        return float(np.sum(module.forward(*inputs) * G))

    for name, m, k in module.named_parameters(trainable_only=True):
        num = numerical_gradient(loss, m.params[k], eps)
        assert_close(analytic[name], num, f"d{name}", rtol=rtol)
    if check_inputs:
        dxs = dx if isinstance(dx, tuple) else (dx,)
        names = input_names or [f"x{i}" for i in range(len(inputs))]
        float_inputs = [(n, x) for n, x in zip(names, inputs) if np.asarray(x).dtype.kind == "f"]
        for (n, x), d in zip(float_inputs, dxs):
            num = numerical_gradient(loss, x, eps)
            assert_close(d, num, f"d{n}", rtol=rtol)
    module.cache = None
