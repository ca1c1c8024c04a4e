"""The frozen-base fast paths against the canonical computations they replace.

- ops.linear.matmul_add (out += α · a b by one in-place gemm) against out + α · (a b) written in
  float64 NumPy here, on contiguous, column-sliced and Fortran-ordered operands, and its fallback;
- the low-rank branch accumulated into the base's output / input gradient (lowrank_forward out=,
  lowrank_backward dx_out=) against the same function's separate-array path;
- a frozen Linear: no dW, no bias sum, no cached x; dx bit-identical to dY W;
- the stacked forward y = [x | xa | 1] [Wᵀ; s·Bᵀ; b] (lowrank_stacked_forward; LoraLinear's float32
  path where d_out > d_in) against linear_forward + lowrank_forward, and the base weight it turns
  into a view of the stacked weight (merge, Delta-LoRA's in-place update, a replaced weight); the
  stacked dx = [dY | s·dY B] [W; A] (lowrank_stacked_backward; where d_out < d_in) likewise;
- LoraLinear's whole forward/backward against the equations written out in float64 NumPy.

Tolerances: testing.RTOL (float64 1e-10, float32 1e-4): the fused gemm applies α to the sum and
adds in one kernel, so it rounds differently from "product, scale, add". dA and dB take the same
products in the same order on both paths and are compared bit for bit.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.adapters.lora import A_KEY, B_KEY, LoraLinear
from spectral_peft.model.layers import LayerNorm, RMSNorm
from spectral_peft.module import Linear
from spectral_peft.ops.linear import matmul_add
from spectral_peft.ops.norm import layernorm_backward, layernorm_forward
from spectral_peft.ops.lowrank import (lowrank_backward, lowrank_forward, lowrank_stacked_backward,
                                      lowrank_stacked_forward)
from spectral_peft.testing import RTOL, assert_close

DTYPES = ["float32", "float64"]


def _rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(7, 3, 5), (64, 8, 48), (1, 1, 1), (5, 1, 3)])
@pytest.mark.parametrize("order", ["CC", "FC", "CF", "FF"])
def test_matmul_add_equals_out_plus_product(dtype, mkn, order):
    m, k, n = mkn
    rng = np.random.default_rng(0)
    a, b, out = _rand(rng, (m, k), dtype), _rand(rng, (k, n), dtype), _rand(rng, (m, n), dtype)
    expected = out.astype(np.float64) + 2.5 * (a.astype(np.float64) @ b.astype(np.float64))
    a_in = np.asfortranarray(a) if order[0] == "F" else a
    b_in = np.asfortranarray(b) if order[1] == "F" else b
    got = out.copy()
    ret = matmul_add(got, a_in, b_in, 2.5)
    assert ret is got  # in place
    assert_close(got, expected, "out += 2.5 a b", RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_add_into_column_slice_leaves_the_rest(dtype):
    rng = np.random.default_rng(1)
    a, b = _rand(rng, (16, 4), dtype), _rand(rng, (4, 6), dtype)
    wide = _rand(rng, (16, 9), dtype)
    before = wide.copy()
    matmul_add(wide[:, :6], a, b.T.copy().T, -0.5)  # rows of out strided by 9, b Fortran-ordered
    expected = before[:, :6].astype(np.float64) - 0.5 * (a.astype(np.float64) @ b.astype(np.float64))
    assert_close(wide[:, :6], expected, "slice += -0.5 a b", RTOL[dtype])
    np.testing.assert_array_equal(wide[:, 6:], before[:, 6:])


def test_matmul_add_fallback_for_strided_columns():
    rng = np.random.default_rng(2)
    a, b = _rand(rng, (8, 3), "float64"), _rand(rng, (3, 5), "float64")
    wide = _rand(rng, (8, 10), "float64")
    before = wide.copy()
    matmul_add(wide[:, ::2], a, b)  # columns not contiguous: the out += a @ b path
    assert_close(wide[:, ::2], before[:, ::2] + a @ b, "strided out", RTOL["float64"])
    np.testing.assert_array_equal(wide[:, 1::2], before[:, 1::2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(12,), (3, 4)])
def test_lowrank_accumulated_equals_separate_branch(dtype, lead):
    rng = np.random.default_rng(3)
    d_in, d_out, r, s = 10, 7, 3, 1.75
    x = _rand(rng, (*lead, d_in), dtype)
    A, B = _rand(rng, (r, d_in), dtype), _rand(rng, (d_out, r), dtype)
    y0, dy, dx0 = _rand(rng, (*lead, d_out), dtype), _rand(rng, (*lead, d_out), dtype), _rand(rng, (*lead, d_in), dtype)

    yb, cache = lowrank_forward(x, A, B, s)  # canonical: the branch as its own array
    out = y0.copy()
    y, cache_f = lowrank_forward(x, A, B, s, out=out)
    assert y is out
    assert_close(y, y0.astype(np.float64) + yb, "y0 + branch", RTOL[dtype])
    assert cache_f[0] is x  # the branch input is shared, not copied
    np.testing.assert_array_equal(cache_f[1], cache[1])  # xa = x Aᵀ, the same product

    dxb, dA, dB = lowrank_backward(dy, cache, A, B, s)
    d_acc = dx0.copy()
    dx, dA_f, dB_f = lowrank_backward(dy, cache_f, A, B, s, dx_out=d_acc)
    assert dx is d_acc
    assert_close(dx, dx0.astype(np.float64) + dxb, "dx0 + branch dx", RTOL[dtype])
    np.testing.assert_array_equal(dA_f, dA)
    np.testing.assert_array_equal(dB_f, dB)


def test_frozen_linear_keeps_nothing_and_computes_dx_only():
    rng = np.random.default_rng(4)
    W, b = rng.standard_normal((6, 5)), rng.standard_normal(6)
    lin = Linear(W, b)
    lin.freeze()
    x, dy = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 6))
    y = lin.forward(x)
    assert lin.cache[0] is None  # no x cached: only dW would need it
    assert_close(y, x @ W.T + b, "y", RTOL["float64"])
    dx = lin.backward(dy)
    np.testing.assert_array_equal(dx, (dy.reshape(-1, 6) @ W).reshape(2, 3, 5))  # the same single product
    assert lin.grads == {}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("freeze_a", [False, True])
@pytest.mark.parametrize("d_in,d_out", [(12, 9), (9, 12)])  # float32: folded forward + stacked dx, stacked forward
def test_lora_linear_equals_the_equations(dtype, freeze_a, d_in, d_out):
    rng = np.random.default_rng(5)
    r, alpha = 4, 6.0
    W, bias = _rand(rng, (d_out, d_in), dtype), _rand(rng, (d_out,), dtype)
    layer = LoraLinear(Linear(W, bias), r=r, lora_alpha=alpha, init_lora_weights=False, rng=np.random.default_rng(0))
    layer.base_layer.freeze()
    if freeze_a:
        layer.freeze(A_KEY)  # LoRA-FA's case: x is not kept
    A, B = layer.params[A_KEY], layer.params[B_KEY]
    s = alpha / r
    x, dy = _rand(rng, (2, 5, d_in), dtype), _rand(rng, (2, 5, d_out), dtype)
    f = [a.astype(np.float64) for a in (W, bias, A, B, x, dy)]
    W64, b64, A64, B64, x64, dy64 = f
    y = layer.forward(x)
    assert (layer.cache[0][0] is x) != freeze_a  # x shared with the branch, only while A trains
    assert_close(y, x64 @ W64.T + b64 + s * (x64 @ A64.T) @ B64.T, "y", RTOL[dtype])
    dx = layer.backward(dy)
    n = dy64.reshape(-1, d_out)
    assert_close(dx, dy64 @ W64 + s * (dy64 @ B64) @ A64, "dx", RTOL[dtype])
    assert_close(layer.grads[B_KEY], s * n.T @ (x64.reshape(-1, d_in) @ A64.T), "dB", RTOL[dtype])
    if freeze_a:
        assert A_KEY not in layer.grads
    else:
        assert_close(layer.grads[A_KEY], s * (n @ B64).T @ x64.reshape(-1, d_in), "dA", RTOL[dtype])
    assert layer.base_layer.grads == {}


@pytest.mark.parametrize("dtype", DTYPES)
def test_trainable_linear_accumulates_dW_in_place(dtype):
    rng = np.random.default_rng(6)
    W, b = _rand(rng, (6, 5), dtype), _rand(rng, (6,), dtype)
    lin = Linear(W, b)
    x, dy = _rand(rng, (4, 5), dtype), _rand(rng, (4, 6), dtype)
    lin.forward(x)
    lin.backward(dy)  # first backward: the accumulator is allocated from dW
    first = lin.grads["weight"]
    assert_close(first, dy.astype(np.float64).T @ x, "dW", RTOL[dtype])
    lin.forward(x)
    lin.backward(dy)  # second: added into the same array
    assert lin.grads["weight"] is first
    assert_close(first, 2 * (dy.astype(np.float64).T @ x), "2 dW", RTOL[dtype])
    assert_close(lin.grads["bias"], 2 * dy.astype(np.float64).sum(axis=0), "2 db", RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_folded_branch_plus_accumulated_base_equals_canonical(dtype):
    """The LoRA forward's order: s·xa Bᵀ + b in one (N, r+1) product, then x Wᵀ accumulated onto it,
    against linear_forward + lowrank_forward as separate arrays."""
    from spectral_peft.ops.linear import linear_forward

    rng = np.random.default_rng(10)
    d_in, d_out, r, s = 9, 6, 3, 1.25
    x = _rand(rng, (2, 4, d_in), dtype)
    W, b, A, B = (_rand(rng, sh, dtype) for sh in ((d_out, d_in), (d_out,), (r, d_in), (d_out, r)))
    y0, _ = linear_forward(x, W, b, keep_x=False)
    yb, (_, xa) = lowrank_forward(x, A, B, s)
    y, (xk, xa_f) = lowrank_forward(x, A, B, s, bias=b)
    assert xk is x
    np.testing.assert_array_equal(xa_f, xa.reshape(xa_f.shape))  # x Aᵀ: the same product, written into [xa | 1]
    y, cache = linear_forward(x, W, None, keep_x=False, out=y)
    assert cache == (None, False)
    assert_close(y, y0.astype(np.float64) + yb, "b + branch + x Wᵀ", RTOL[dtype])


def test_lora_forward_takes_the_folded_path_for_a_frozen_dense_base():
    rng = np.random.default_rng(11)
    f32 = np.float32
    layer = LoraLinear(Linear(rng.standard_normal((4, 5)).astype(f32), rng.standard_normal(4).astype(f32)), r=2,
                       init_lora_weights=False, rng=np.random.default_rng(0))  # d_out 4 <= d_in 5
    layer.base_layer.freeze()
    layer.forward(rng.standard_normal((3, 5)).astype(f32))
    assert getattr(layer, "_stack", None) is None  # not the stacked path
    assert layer.base_layer.cache == (None, True)  # set as the base's own frozen forward sets it
    xa = layer.cache[0][1]
    assert xa.shape == (3, 2) and xa.strides == (3 * 4, 4)  # xa, a view of [xa | 1] (rows r + 1 apart)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_stacked_forward_equals_canonical(dtype, has_bias):
    rng = np.random.default_rng(12)
    d_in, d_out, r, s = 5, 11, 3, 1.5
    x, xd = _rand(rng, (2, 4, d_in), dtype), _rand(rng, (2, 4, d_in), dtype)  # xd: the branch's (dropped) input
    W, b, A, B = (_rand(rng, sh, dtype) for sh in ((d_out, d_in), (d_out,), (r, d_in), (d_out, r)))
    V = np.full((d_in + r + 1, d_out), np.nan, dtype=dtype)
    V[:d_in] = W.T
    V[-1] = b if has_bias else 0
    y, (xk, xa) = lowrank_stacked_forward(x, xd, A, B, s, V)
    assert xk is xd and xa.flags.c_contiguous and xa.base is None  # xa its own (N, r) array, not a view of [x | xa | 1]
    np.testing.assert_array_equal(xa, xd.reshape(-1, d_in) @ A.T)  # the same product as lowrank_forward's
    f = [a.astype(np.float64) for a in (x, xd, W, b, A, B)]
    x64, xd64, W64, b64, A64, B64 = f
    want = x64 @ W64.T + (b64 if has_bias else 0) + s * (xd64 @ A64.T) @ B64.T
    assert y.shape == (2, 4, d_out) and y.dtype == dtype and y.flags.c_contiguous
    assert_close(y, want, "[x | xa | 1] @ [Wᵀ; s·Bᵀ; b]", RTOL[dtype])
    np.testing.assert_array_equal(V[d_in:d_in + r], (B.T * s).astype(dtype))  # s·Bᵀ written into its rows
    _, (xk, _) = lowrank_stacked_forward(x, xd, A, B, s, V, keep_x=False)
    assert xk is None


def _stacked_layer(rng):
    f32 = np.float32
    layer = LoraLinear(Linear(rng.standard_normal((7, 3)).astype(f32), rng.standard_normal(7).astype(f32)), r=2,
                       init_lora_weights="gaussian", rng=np.random.default_rng(0))  # d_out 7 > d_in 3
    layer.base_layer.freeze()
    return layer


def _layer_equations(layer, x):
    W, b = (layer.base_layer.params[k].astype(np.float64) for k in ("weight", "bias"))
    A, B = (layer.params[k].astype(np.float64) for k in (A_KEY, B_KEY))
    x64 = x.astype(np.float64)
    return x64 @ W.T + b + layer.scaling * (x64 @ A.T) @ B.T


def test_lora_forward_takes_the_stacked_path_and_holds_the_weight_once():
    rng = np.random.default_rng(13)
    layer = _stacked_layer(rng)
    W0 = layer.base_layer.params["weight"].copy()
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y = layer.forward(x)
    W = layer.base_layer.params["weight"]
    assert layer._stack.shape == (3 + 2 + 1, 7)
    assert W.base is layer._stack and np.shares_memory(W, layer._stack)  # the base weight is a view of the stack
    np.testing.assert_array_equal(W, W0)  # the same values
    assert layer.base_layer.cache == (None, True)
    assert_close(y, _layer_equations(layer, x), "stacked y", RTOL["float32"])
    dx = layer.backward(rng.standard_normal((4, 7)).astype(np.float32))
    assert dx.shape == (4, 3) and set(layer.grads) == {A_KEY, B_KEY}


def test_stacked_weight_follows_merge_in_place_updates_and_a_replaced_weight():
    rng = np.random.default_rng(14)
    layer = _stacked_layer(rng)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    layer.forward(x)
    stack = layer._stack
    layer.merge()  # W += s·B A in the view: the stack's Wᵀ rows change with it
    assert_close(stack[:3].T, layer.base_layer.params["weight"].astype(np.float64), "merged stack", 0.0)
    layer.unmerge()
    layer.base_layer.params["weight"] += np.float32(0.5)  # an in-place update (Delta-LoRA's)
    assert_close(layer.forward(x), _layer_equations(layer, x), "after an in-place update", RTOL["float32"])
    assert layer._stack is stack
    new = rng.standard_normal((7, 3)).astype(np.float32)
    layer.base_layer.params["weight"] = new  # another array installed: the stack is rebuilt from it
    y = layer.forward(x)
    assert layer._stack is not stack and layer.base_layer.params["weight"].base is layer._stack
    np.testing.assert_array_equal(layer.base_layer.params["weight"], new)
    assert_close(y, _layer_equations(layer, x), "after a replaced weight", RTOL["float32"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_frozen_norm_computes_dx_only_and_the_same_dx(dtype, kind):
    """A frozen norm (LoRA's base) skips the column sums of dweight/dbias; its dx is the trainable
    norm's bit for bit (the same operations in the same order)."""
    rng = np.random.default_rng(15)
    C = 6
    w, b = _rand(rng, (C,), dtype), _rand(rng, (C,), dtype)
    x, dy = _rand(rng, (2, 3, C), dtype), _rand(rng, (2, 3, C), dtype)

    def make():
        return LayerNorm(w.copy(), b.copy(), 1e-5) if kind == "layernorm" else RMSNorm(w.copy(), 1e-6)

    trained, frozen = make(), make()
    frozen.freeze()
    dx_t = (trained.forward(x), trained.backward(dy))[1]
    dx_f = (frozen.forward(x), frozen.backward(dy))[1]
    np.testing.assert_array_equal(dx_f, dx_t)
    assert frozen.grads == {} and set(trained.grads) == ({"weight", "bias"} if kind == "layernorm" else {"weight"})
    _, cache = layernorm_forward(x, w, b)
    dx, dw, db = layernorm_backward(dy, cache, w, need_dparams=False)
    assert dw is None and db is None
    np.testing.assert_array_equal(dx, layernorm_backward(dy, cache, w)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need", [(True, True), (False, True), (True, False)])
def test_stacked_backward_equals_canonical(dtype, need):
    need_dA, need_dB = need
    rng = np.random.default_rng(16)
    d_in, d_out, r, s = 11, 5, 3, 0.75
    x, dy = _rand(rng, (2, 4, d_in), dtype), _rand(rng, (2, 4, d_out), dtype)
    W, A, B = (_rand(rng, sh, dtype) for sh in ((d_out, d_in), (r, d_in), (d_out, r)))
    _, cache = lowrank_forward(x, A, B, s)
    U = np.full((d_out + r, d_in), np.nan, dtype=dtype)
    U[:d_out] = W
    dx, dA, dB = lowrank_stacked_backward(dy, cache, A, B, s, U, need_dA=need_dA, need_dB=need_dB)
    _, dA0, dB0 = lowrank_backward(dy, cache, A, B, s, need_dA=need_dA, need_dB=need_dB, need_dx=False)
    for name, got, want in (("dA", dA, dA0), ("dB", dB, dB0)):  # the same products in the same order
        assert (got is None) == (want is None), name
        if want is not None:
            np.testing.assert_array_equal(got, want)
    W64, A64, B64, dy64 = (a.astype(np.float64) for a in (W, A, B, dy))
    assert dx.shape == x.shape and dx.dtype == dtype and dx.flags.c_contiguous
    assert_close(dx, dy64 @ W64 + s * (dy64 @ B64) @ A64, "[dY | s·dY B] @ [W; A]", RTOL[dtype])
    np.testing.assert_array_equal(U[d_out:], A)


def test_lora_backward_takes_the_stacked_dx_where_d_out_is_smaller():
    rng = np.random.default_rng(17)
    f32 = np.float32
    layer = LoraLinear(Linear(rng.standard_normal((3, 7)).astype(f32), rng.standard_normal(3).astype(f32)), r=2,
                       init_lora_weights="gaussian", rng=np.random.default_rng(0))  # d_out 3 < d_in 7
    layer.base_layer.freeze()
    W0 = layer.base_layer.params["weight"].copy()
    x, dy = rng.standard_normal((4, 7)).astype(f32), rng.standard_normal((4, 3)).astype(f32)
    layer.forward(x)
    assert layer._stacked_dx
    dx = layer.backward(dy)
    W = layer.base_layer.params["weight"]
    assert W.base is layer._stack and W.flags.c_contiguous and layer._stack.shape == (3 + 2, 7)
    np.testing.assert_array_equal(W, W0)
    A, B = (layer.params[k].astype(np.float64) for k in (A_KEY, B_KEY))
    dy64 = dy.astype(np.float64)
    assert_close(dx, dy64 @ W0.astype(np.float64) + layer.scaling * (dy64 @ B) @ A, "stacked dx", RTOL["float32"])
    assert layer.base_layer.cache is None and set(layer.grads) == {A_KEY, B_KEY}
    dropped = LoraLinear(Linear(W0.copy(), rng.standard_normal(3).astype(f32)), r=2, lora_dropout=0.5,
                         init_lora_weights="gaussian", rng=np.random.default_rng(0))
    dropped.base_layer.freeze()
    dropped.forward(x)
    assert not dropped._stacked_dx  # dropout between x and the branch: dx cannot be one product


@pytest.mark.parametrize("d_in,d_out", [(4, 9), (9, 4)])  # stacked forward / folded forward, plain backward
def test_lora_linear_with_dropout_equals_the_equations(d_in, d_out):
    rng = np.random.default_rng(18)
    f32 = np.float32
    W, bias = rng.standard_normal((d_out, d_in)).astype(f32), rng.standard_normal(d_out).astype(f32)
    layer = LoraLinear(Linear(W.copy(), bias.copy()), r=3, lora_alpha=6.0, lora_dropout=0.4,
                       init_lora_weights="gaussian", rng=np.random.default_rng(0))
    layer.base_layer.freeze()
    x, dy = rng.standard_normal((5, d_in)).astype(f32), rng.standard_normal((5, d_out)).astype(f32)
    y = layer.forward(x)
    keep, scale = layer.cache[1]
    assert not layer._stacked_dx
    A, B = (layer.params[k].astype(np.float64) for k in (A_KEY, B_KEY))
    x64, dy64, W64, s = x.astype(np.float64), dy.astype(np.float64), W.astype(np.float64), layer.scaling
    xd = x64 * keep * scale  # the branch's input, drop(x)
    assert_close(y, x64 @ W64.T + bias + s * (xd @ A.T) @ B.T, "y with dropout", RTOL["float32"])
    dx = layer.backward(dy)
    assert_close(dx, dy64 @ W64 + (s * (dy64 @ B) @ A) * keep * scale, "dx with dropout", RTOL["float32"])
    assert_close(layer.grads[A_KEY], s * (dy64 @ B).T @ xd, "dA with dropout", RTOL["float32"])


@settings(deadline=None)
@given(d_in=st.integers(1, 12), d_out=st.integers(1, 12), r=st.integers(1, 5), n=st.integers(1, 9),
       has_bias=st.booleans(), freeze_a=st.booleans(), dropout=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2 ** 16))
def test_lora_linear_float32_paths_equal_the_equations_property(d_in, d_out, r, n, has_bias, freeze_a, dropout, seed):
    """Every float32 path of LoraLinear (stacked or folded forward, stacked or accumulated dx, with or
    without bias, dropout, a frozen A) against the equations in float64, over drawn shapes."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    W = rng.standard_normal((d_out, d_in)).astype(f32)
    bias = rng.standard_normal(d_out).astype(f32) if has_bias else None
    layer = LoraLinear(Linear(W.copy(), None if bias is None else bias.copy()), r=r, lora_alpha=2.0 * r,
                       lora_dropout=dropout, init_lora_weights=False, rng=np.random.default_rng(seed))
    layer.base_layer.freeze()
    if freeze_a:
        layer.freeze(A_KEY)
    x, dy = rng.standard_normal((n, d_in)).astype(f32), rng.standard_normal((n, d_out)).astype(f32)
    y = layer.forward(x)
    keep, scale = layer.cache[1] if layer.cache[1] is not None else (np.ones_like(x, dtype=bool), 1.0)
    A, B = (layer.params[k].astype(np.float64) for k in (A_KEY, B_KEY))
    x64, dy64, W64, s = x.astype(np.float64), dy.astype(np.float64), W.astype(np.float64), layer.scaling
    xd = x64 * keep * scale
    b64 = 0.0 if bias is None else bias.astype(np.float64)
    # absolute floor: float32 rounding of sums of O(d) unit-scale products
    tol = dict(rtol=1e-4, atol=1e-4 * (1 + d_in + d_out + r))
    assert_close(y, x64 @ W64.T + b64 + s * (xd @ A.T) @ B.T, "y", **tol)
    dx = layer.backward(dy)
    assert_close(dx, dy64 @ W64 + (s * (dy64 @ B) @ A) * keep * scale, "dx", **tol)
    assert_close(layer.grads[B_KEY], s * dy64.T @ (xd @ A.T), "dB", **tol)
    assert (A_KEY in layer.grads) != freeze_a
    if not freeze_a:
        assert_close(layer.grads[A_KEY], s * (dy64 @ B).T @ xd, "dA", **tol)
    np.testing.assert_array_equal(layer.base_layer.params["weight"], W)  # the frozen weight, wherever it lives
