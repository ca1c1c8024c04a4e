"""Ops: float64 central-difference checks of every backward on Hypothesis-drawn small shapes,
the invariants each op promises, and the errors bad input gets.

Every gradient check forms L = Σ forward(inputs) ⊙ G for a random G and compares each analytic
gradient with testing.numerical_gradient (rtol 1e-6); it also asserts that neither the forward nor
the backward wrote into its inputs or into G.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.ops import (ACTIVATIONS, attention_backward, attention_forward, cross_entropy_backward,
                               cross_entropy_forward, dropout_backward, dropout_forward, embedding_backward,
                               embedding_forward, fanout_backward, gelu_forward, get_activation,
                               layernorm_backward, layernorm_forward, merge_heads, merge_heads_backward,
                               residual_backward, residual_forward, rmsnorm_backward, rmsnorm_forward,
                               softmax_backward, softmax_forward, split_heads, split_heads_backward)
from spectral_peft.testing import assert_close
from spectral_peft.testing import RTOL as RTOL_BY_DTYPE
from tests._gradcheck import check_grads

seeds = st.integers(0, 2**31 - 1)
small = st.integers(1, 3)
odd = st.sampled_from([1, 3, 5])


def normal(rng, *shape):
    return rng.standard_normal(shape)


# --- gradient checks ---------------------------------------------------------------------------

@given(seed=seeds, B=small, T=small, C=odd)
def test_layernorm_gradients(seed, B, T, C):
    rng = np.random.default_rng(seed)
    x, w, b = normal(rng, B, T, C), normal(rng, C), normal(rng, C)
    check_grads(lambda x, w, b: layernorm_forward(x, w, b, 1e-5),
                lambda g, c: layernorm_backward(g, c, w), {"x": x, "weight": w, "bias": b}, seed)


@given(seed=seeds, B=small, T=small, C=odd)
def test_rmsnorm_gradients(seed, B, T, C):
    rng = np.random.default_rng(seed)
    x, w = normal(rng, B, T, C), normal(rng, C)
    check_grads(lambda x, w: rmsnorm_forward(x, w, 1e-6), lambda g, c: rmsnorm_backward(g, c, w),
                {"x": x, "weight": w}, seed)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(seed=seeds, N=small, C=odd)
def test_activation_gradients(name, seed, N, C):
    x = 2.0 * normal(np.random.default_rng(seed), N, C)
    if name == "relu":
        x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink, where the derivative is undefined
    fwd, bwd = get_activation(name)
    check_grads(fwd, bwd, {"x": x}, seed)


@given(seed=seeds, B=small, T=small, C=odd, axis=st.sampled_from([-1, 0, 1]))
def test_softmax_gradients(seed, B, T, C, axis):
    x = 3.0 * normal(np.random.default_rng(seed), B, T, C)
    check_grads(lambda x: softmax_forward(x, axis), softmax_backward, {"x": x}, seed)


@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 2), T=small, hd=odd, causal=st.booleans(),
       padded=st.booleans())
def test_attention_gradients(seed, B, H, T, hd, causal, padded):
    rng = np.random.default_rng(seed)
    q, k, v = normal(rng, B, H, T, hd), normal(rng, B, H, T, hd), normal(rng, B, H, T, hd)
    mask = None
    if padded:
        mask = (rng.random((B, T)) < 0.7).astype(np.int64)  # rows may end up fully masked: grads must be 0 there
    check_grads(lambda q, k, v: attention_forward(q, k, v, causal, mask), attention_backward,
                {"q": q, "k": k, "v": v}, seed)


@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 2), T=small, hd=odd, causal=st.booleans(),
       p=st.sampled_from([0.2, 0.5]), shift=st.booleans())
def test_attention_with_dropout_gradients(seed, B, H, T, hd, causal, p, shift):
    rng = np.random.default_rng(seed)
    T = 2 * T if shift else T  # S2-Attn needs an even group dividing T
    q, k, v = normal(rng, B, H, T, hd), normal(rng, B, H, T, hd), normal(rng, B, H, T, hd)
    check_grads(lambda q, k, v: attention_forward(q, k, v, causal, shift_group=T if shift else None, dropout_p=p,
                                                  rng=np.random.default_rng(seed + 1)),
                attention_backward, {"q": q, "k": k, "v": v}, seed)


@given(seed=seeds, B=small, T=small, C=odd, V=st.integers(1, 5))
def test_embedding_gradients(seed, B, T, C, V):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    table = normal(rng, V, C)
    check_grads(lambda t: embedding_forward(ids, t), embedding_backward, {"table": table}, seed)


@given(seed=seeds, N=st.integers(1, 5), V=odd, n_ignored=st.integers(0, 5))
def test_cross_entropy_gradients(seed, N, V, n_ignored):
    rng = np.random.default_rng(seed)
    logits = 2.0 * normal(rng, N, V)
    targets = rng.integers(0, V, N)
    targets[rng.permutation(N)[:n_ignored]] = -100
    check_grads(lambda z: cross_entropy_forward(z, targets), cross_entropy_backward, {"logits": logits}, seed,
                scalar_out=True)


@given(seed=seeds, N=small, C=odd, p=st.sampled_from([0.0, 0.1, 0.5, 0.9]), training=st.booleans())
def test_dropout_gradients(seed, N, C, p, training):
    x = normal(np.random.default_rng(seed), N, C)
    # a fresh generator with the same seed per call: the same mask every time L is evaluated
    check_grads(lambda x: dropout_forward(x, p, np.random.default_rng(seed + 1), training), dropout_backward,
                {"x": x}, seed)


@given(seed=seeds, B=small, T=small, H=st.integers(1, 3), hd=odd)
def test_split_merge_heads_gradients(seed, B, T, H, hd):
    rng = np.random.default_rng(seed)
    x = normal(rng, B, T, H * hd)
    check_grads(lambda x: (split_heads(x, H), None), lambda g, c: split_heads_backward(g), {"x": x}, seed)
    y = normal(rng, B, H, T, hd)
    check_grads(lambda y: (merge_heads(y), None), lambda g, c: merge_heads_backward(g, H), {"y": y}, seed)


@given(seed=seeds, N=small, C=odd)
def test_residual_gradients(seed, N, C):
    rng = np.random.default_rng(seed)
    x, fx = normal(rng, N, C), normal(rng, N, C)
    check_grads(lambda x, fx: (residual_forward(x, fx), None), lambda g, c: residual_backward(g),
                {"x": x, "fx": fx}, seed)


@given(seed=seeds, N=small, C=odd)
def test_fanout_gradient_of_a_shared_input(seed, N, C):
    """y = LayerNorm(x) + x: x feeds two branches, its gradient is the sum of the two."""
    rng = np.random.default_rng(seed)
    x, w, b = normal(rng, N, C), normal(rng, C), normal(rng, C)

    def forward(x):
        h, ln_cache = layernorm_forward(x, w, b, 1e-5)
        return residual_forward(x, h), ln_cache

    def backward(g, ln_cache):
        dx_direct, dh = residual_backward(g)
        dx_ln, _, _ = layernorm_backward(dh, ln_cache, w)
        return fanout_backward(dx_direct, dx_ln)

    check_grads(forward, backward, {"x": x}, seed)


# --- invariants --------------------------------------------------------------------------------

@given(seed=seeds, B=small, T=small, C=odd, scale=st.sampled_from([1.0, 100.0, 1e4]))
def test_softmax_rows_sum_to_one_without_overflow(seed, B, T, C, scale):
    x = scale * normal(np.random.default_rng(seed), B, T, C)
    for dtype in (np.float64, np.float32):
        y, _ = softmax_forward(x.astype(dtype))
        assert y.dtype == dtype
        assert np.all(np.isfinite(y)) and np.all(y >= 0)
        assert_close(y.sum(axis=-1), np.ones((B, T)), f"row sums {dtype.__name__}", rtol=10 * np.finfo(dtype).eps * C)


@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(2, 6), hd=odd, data=st.data())
def test_causal_attention_ignores_later_tokens(seed, B, H, T, hd, data):
    rng = np.random.default_rng(seed)
    q, k, v = normal(rng, B, H, T, hd), normal(rng, B, H, T, hd), normal(rng, B, H, T, hd)
    t = data.draw(st.integers(1, T - 1), label="first changed position")
    out, _ = attention_forward(q, k, v, True)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[:, :, t:] = normal(rng, B, H, T - t, hd)
    out2, _ = attention_forward(q2, k2, v2, True)
    assert np.array_equal(out[:, :, :t], out2[:, :, :t]), "a later token changed an earlier position's output"
    assert not np.array_equal(out[:, :, t:], out2[:, :, t:])  # the test can fail: later outputs did change


@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(2, 6), hd=odd, causal=st.booleans(),
       data=st.data())
def test_padded_keys_never_change_real_outputs(seed, B, H, T, hd, causal, data):
    rng = np.random.default_rng(seed)
    q, k, v = normal(rng, B, H, T, hd), normal(rng, B, H, T, hd), normal(rng, B, H, T, hd)
    n_real = data.draw(st.integers(1, T - 1), label="real tokens")
    mask = np.zeros((B, T), dtype=bool)
    mask[:, :n_real] = True  # right padding, as GPT-2 and BERT batches use
    out, _ = attention_forward(q, k, v, causal, mask)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, n_real:] = 1e3 * normal(rng, B, H, T - n_real, hd)
    v2[:, :, n_real:] = 1e3 * normal(rng, B, H, T - n_real, hd)
    out2, _ = attention_forward(q, k2, v2, causal, mask)
    assert np.array_equal(out, out2), "padded keys changed an output"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_give_zeros_not_nan(dtype, causal):
    rng = np.random.default_rng(0)
    B, H, T, hd = 3, 2, 4, 3
    q, k, v = (normal(rng, B, H, T, hd).astype(dtype) for _ in range(3))
    mask = np.ones((B, T), dtype=np.int64)
    mask[0] = 0  # sequence 0: all padding, every row fully masked
    mask[1, :2] = 0  # sequence 1: left padding; under causal, queries 0 and 1 see no key
    out, cache = attention_forward(q, k, v, causal, mask)
    dq, dk, dv = attention_backward(normal(rng, B, H, T, hd).astype(dtype), cache)
    for name, a in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert a.dtype == dtype and np.all(np.isfinite(a)), f"{name} has NaN/inf"
    assert np.all(out[0] == 0) and np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0)
    if causal:
        assert np.all(out[1, :, :2] == 0) and np.all(dq[1, :, :2] == 0)
    assert np.all(dk[1, :, :2] == 0) and np.all(dv[1, :, :2] == 0)  # padded keys get no gradient
    assert np.any(out[2] != 0)


def test_dropout_same_seed_is_bitwise_identical_and_statistics_hold():
    x = np.random.default_rng(0).standard_normal((64, 257)).astype(np.float32)
    y1, c1 = dropout_forward(x, 0.25, np.random.default_rng(7), True)
    y2, c2 = dropout_forward(x, 0.25, np.random.default_rng(7), True)
    y3, _ = dropout_forward(x, 0.25, np.random.default_rng(8), True)
    assert y1.dtype == np.float32
    assert np.array_equal(y1, y2) and np.array_equal(c1[0], c2[0])
    assert not np.array_equal(y1, y3)
    dropped = 1.0 - c1[0].mean()
    assert abs(dropped - 0.25) < 0.02, dropped  # 16448 Bernoulli(0.25) draws: sd ≈ 0.0034
    kept = c1[0]
    assert_close(y1[kept], x[kept] / 0.75, "kept values scaled by 1/(1-p)", rtol=1e-6)
    assert np.all(y1[~kept] == 0)


def test_attention_dropout_is_seeded_and_p_zero_is_no_dropout():
    rng = np.random.default_rng(4)
    q, k, v = (normal(rng, 2, 2, 16, 4).astype(np.float32) for _ in range(3))
    plain, _ = attention_forward(q, k, v, True)
    zero, _ = attention_forward(q, k, v, True, dropout_p=0.0, rng=np.random.default_rng(1))
    assert np.array_equal(plain, zero)
    a, ca = attention_forward(q, k, v, True, dropout_p=0.3, rng=np.random.default_rng(1))
    b, _ = attention_forward(q, k, v, True, dropout_p=0.3, rng=np.random.default_rng(1))
    c, _ = attention_forward(q, k, v, True, dropout_p=0.3, rng=np.random.default_rng(2))
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    keep = ca[1][4][0]
    assert keep.shape == (2, 2, 16, 16) and abs(1 - keep.mean() - 0.3) < 0.05  # 1024 draws: sd ≈ 0.014
    with pytest.raises(ValueError, match="needs rng"):
        attention_forward(q, k, v, True, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        attention_forward(q, k, v, True, dropout_p=1.0, rng=np.random.default_rng(0))


def test_dropout_is_identity_when_not_training_or_p_zero():
    x = np.arange(6.0).reshape(2, 3)
    for p, training in ((0.5, False), (0.0, True)):
        y, cache = dropout_forward(x, p, np.random.default_rng(0), training)
        assert cache is None and np.array_equal(y, x)
        g = np.ones_like(x)
        assert np.array_equal(dropout_backward(g, cache), g)


def test_embedding_backward_accumulates_repeated_ids():
    """dtable against an independent accumulation: a Python loop over the tokens."""
    rng = np.random.default_rng(3)
    V, C = 7, 5
    ids = np.array([[1, 3, 1, 6], [6, 6, 0, 1]])
    table = rng.standard_normal((V, C))
    out, cache = embedding_forward(ids, table)
    for (b, t), i in np.ndenumerate(ids):
        assert np.array_equal(out[b, t], table[i])
    dout = rng.standard_normal((2, 4, C))
    expected = np.zeros((V, C))
    for (b, t), i in np.ndenumerate(ids):
        expected[i] += dout[b, t]
    dtable = embedding_backward(dout, cache)
    assert_close(dtable, expected, "dtable", rtol=1e-12)
    assert np.all(dtable[[2, 4, 5]] == 0)  # unused rows get exactly zero


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_backward_accumulates_into_an_existing_gradient(dtype):
    rng = np.random.default_rng(5)
    V, C = 9, 4
    ids = np.array([[8, 0, 8], [3, 3, 3]])
    _, cache = embedding_forward(ids, np.zeros((V, C), dtype))
    dout = rng.standard_normal((2, 3, C)).astype(dtype)
    grad = rng.standard_normal((V, C)).astype(dtype)
    expected = grad.astype(np.float64)
    for (b, t), i in np.ndenumerate(ids):
        expected[i] += dout[b, t]
    result = embedding_backward(dout, cache, accumulate_into=grad)
    assert result is grad and grad.dtype == dtype
    assert_close(grad, expected, "accumulated dtable", rtol=RTOL_BY_DTYPE[np.dtype(dtype).name])
    with pytest.raises(ValueError, match=r"accumulate_into must be a \(V, C\) = \(9, 4\)"):
        embedding_backward(dout, cache, accumulate_into=np.zeros((8, 4), dtype))


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = np.random.default_rng(0).standard_normal((4, 6))
    loss, cache = cross_entropy_forward(logits, np.full(4, -100))
    assert loss == 0.0
    d = cross_entropy_backward(1.0, cache)
    assert d.shape == (4, 6) and np.all(d == 0)


def test_cross_entropy_cache_is_consumed_once():
    loss, cache = cross_entropy_forward(np.zeros((2, 3)), np.array([0, 2]))
    assert_close(np.array(loss), np.array(np.log(3.0)), "uniform loss = log V", rtol=1e-15)
    cross_entropy_backward(1.0, cache)
    with pytest.raises(RuntimeError, match="already consumed"):
        cross_entropy_backward(1.0, cache)


def test_split_heads_layout_matches_reshape_definition():
    B, T, H, hd = 2, 3, 4, 5
    x = np.arange(B * T * H * hd, dtype=np.float64).reshape(B, T, H * hd)
    y = split_heads(x, H)
    assert y.shape == (B, H, T, hd)
    for b, h, t in np.ndindex(B, H, T):
        assert np.array_equal(y[b, h, t], x[b, t, h * hd:(h + 1) * hd])
    assert np.array_equal(merge_heads(y), x)


def test_fanout_sums_and_does_not_modify_inputs():
    a, b, c = np.ones(3), 2 * np.ones(3), 4 * np.ones(3)
    s = fanout_backward(a, None, b, c)
    assert np.array_equal(s, 7 * np.ones(3)) and np.array_equal(a, np.ones(3))
    single = fanout_backward(a)
    assert single is not a and np.array_equal(single, a)


# --- bad input ---------------------------------------------------------------------------------

def test_embedding_rejects_out_of_range_ids():
    table = np.zeros((5, 2))
    with pytest.raises(ValueError, match=r"token id 5 .*V = 5"):
        embedding_forward(np.array([[0, 5]]), table)
    with pytest.raises(ValueError, match=r"token id -1 "):
        embedding_forward(np.array([-1]), table)
    with pytest.raises(ValueError, match="integer"):
        embedding_forward(np.array([0.0]), table)
    with pytest.raises(ValueError, match=r"table must have shape \(V, C\)"):
        embedding_forward(np.array([0]), np.zeros(5))


def test_unknown_activation_lists_known_names():
    with pytest.raises(ValueError, match="known names: .*gelu_new.*"):
        get_activation("gelu_fast")
    with pytest.raises(ValueError, match="approximate"):
        gelu_forward(np.zeros(3), approximate="sigmoid")
    for name in ACTIVATIONS:
        with pytest.raises(ValueError, match="float array"):
            get_activation(name).forward(np.arange(3))  # integers


def test_shape_errors_name_the_argument():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(4,\)"):
        layernorm_forward(x, np.ones(3), np.zeros(4))
    with pytest.raises(ValueError, match="bias"):
        layernorm_forward(x, np.ones(4), np.zeros(5))
    with pytest.raises(ValueError, match="weight"):
        rmsnorm_forward(x, np.ones(5))
    with pytest.raises(ValueError, match="weight must have x's dtype float32"):
        layernorm_forward(x.astype(np.float32), np.ones(4), np.zeros(4, np.float32))
    q = np.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError, match="k must have q's shape"):
        attention_forward(q, np.zeros((1, 2, 4, 4)), q, True)
    with pytest.raises(ValueError, match="q must have shape"):
        attention_forward(x, x, x, True)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, T\) = \(1, 3\)"):
        attention_forward(q, q, q, False, np.ones((1, 4)))
    with pytest.raises(ValueError, match="positive divisor"):
        split_heads(x, 3)
    with pytest.raises(ValueError, match="fx must have"):
        residual_forward(x, np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="targets must have shape"):
        cross_entropy_forward(np.zeros((3, 4)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"logits must be a float array of shape \(N, V\)"):
        cross_entropy_forward(np.zeros(3), np.zeros(3, dtype=np.int64))


def test_cross_entropy_rejects_out_of_range_targets():
    with pytest.raises(ValueError, match=r"targets\[1\] = 4 is outside \[0, V\) with V = 4"):
        cross_entropy_forward(np.zeros((2, 4)), np.array([0, 4]))
    with pytest.raises(ValueError, match=r"targets\[0\] = -1"):
        cross_entropy_forward(np.zeros((2, 4)), np.array([-1, 0]))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.1x"])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match=r"p must be a float in \[0, 1\)"):
        dropout_forward(np.zeros(3), p, np.random.default_rng(0), True)
