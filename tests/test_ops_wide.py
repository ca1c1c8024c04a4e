"""Ops gradient checks on wide shapes and extreme values (the small-shape checks are in test_ops.py).

Widths past a cache line (C up to 70 float64 = 560 bytes), sequences past a block (T up to 40),
and inputs N(0, 1) scaled by 1e3 or 1e-3, or near zero (1e-8 scale, a quarter exactly 0). The
check is tests/_gradcheck.check_grads (central differences, rtol 1e-6). Its step follows the
input's scale where the op's curvature does (norms and elementwise activations: eps = 1e-6·s);
softmax, attention and cross-entropy keep eps <= 1e-6, their curvature being O(1) in the logits.
Each test draws a fifth of the profile's examples (5 under "ci") and at most 4096 elements per
input, so the file stays within a few seconds.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.ops import (ACTIVATIONS, attention_backward, attention_forward, cross_entropy_backward,
                               cross_entropy_forward, embedding_backward, embedding_forward, get_activation,
                               layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward,
                               softmax_backward, softmax_forward)
from tests._gradcheck import check_grads

wide = settings(max_examples=max(3, settings.default.max_examples // 5))
seeds = st.integers(0, 2**31 - 1)
widths = st.sampled_from([1, 7, 8, 9, 33, 64, 65, 70])  # 8 float64 = one 64-byte cache line
lengths = st.sampled_from([1, 2, 17, 31, 32, 33, 40])  # past a block of 32
SCALES = {"normal": 1.0, "large": 1e3, "small": 1e-3, "near_zero": 1e-8}
kinds = st.sampled_from(sorted(SCALES))
MAX_ELEMENTS = 4096


def draw(rng, kind, *shape):
    """N(0, 1) times the kind's scale; near_zero also has a quarter of its entries exactly 0."""
    x = SCALES[kind] * rng.standard_normal(shape)
    if kind == "near_zero":
        x[rng.random(shape) < 0.25] = 0.0
    return x


def step(kind, curvature_follows_input: bool) -> float:
    """The central-difference step for inputs of this kind (module docstring)."""
    s = SCALES[kind]
    if kind == "near_zero":
        return 1e-6
    return 1e-6 * (s if curvature_follows_input else min(s, 1.0))


def bounded(*dims):
    return int(np.prod(dims)) <= MAX_ELEMENTS


NORMS = {  # name -> (forward(x, w, b), backward(g, cache, w) -> grads of (x, w, b) or (x, w), uses bias)
    "layernorm": (lambda x, w, b: layernorm_forward(x, w, b, 1e-5), layernorm_backward, True),
    "rmsnorm": (lambda x, w: rmsnorm_forward(x, w, 1e-6), rmsnorm_backward, False),
}


@pytest.mark.parametrize("norm", sorted(NORMS))
@wide
@given(seed=seeds, B=st.integers(1, 2), T=lengths, C=widths, kind=kinds)
def test_norm_gradients_wide(norm, seed, B, T, C, kind):
    if not bounded(B, T, C):
        B = 1
    forward, backward, has_bias = NORMS[norm]
    rng = np.random.default_rng(seed)
    inputs = {"x": draw(rng, kind, B, T, C), "weight": rng.standard_normal(C)}
    if has_bias:
        inputs["bias"] = rng.standard_normal(C)
    check_grads(forward, lambda g, c: backward(g, c, inputs["weight"]), inputs, seed, eps=step(kind, True))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@wide
@given(seed=seeds, N=lengths, C=widths, kind=kinds)
def test_activation_gradients_wide(name, seed, N, C, kind):
    x = draw(np.random.default_rng(seed), kind, N, C)
    eps = step(kind, True)
    if name == "relu":  # keep every entry farther than the step from the kink, where no derivative exists
        x[np.abs(x) < 10 * eps] = 10 * SCALES[kind] + 20 * eps
    fwd, bwd = get_activation(name)
    check_grads(fwd, bwd, {"x": x}, seed, eps=eps)


@wide
@given(seed=seeds, T=lengths, C=widths, kind=kinds, axis=st.sampled_from([-1, 0]))
def test_softmax_gradients_wide(seed, T, C, kind, axis):
    x = draw(np.random.default_rng(seed), kind, T, C)
    check_grads(lambda x: softmax_forward(x, axis), softmax_backward, {"x": x}, seed, eps=step(kind, False))


@wide
@given(seed=seeds, T=lengths, hd=widths, kind=kinds, causal=st.booleans(), padded=st.booleans())
def test_attention_gradients_wide(seed, T, hd, kind, causal, padded):
    """q and k carry the kind's scale (it is the scores' scale that stresses the softmax); v is N(0, 1)."""
    if not bounded(T, hd):
        hd = MAX_ELEMENTS // T
    rng = np.random.default_rng(seed)
    q, k, v = draw(rng, kind, 1, 1, T, hd), draw(rng, kind, 1, 1, T, hd), rng.standard_normal((1, 1, T, hd))
    mask = (rng.random((1, T)) < 0.8).astype(np.int64) if padded else None
    check_grads(lambda q, k, v: attention_forward(q, k, v, causal, mask), attention_backward,
                {"q": q, "k": k, "v": v}, seed, eps=step(kind, False))


@wide
@given(seed=seeds, N=lengths, V=widths, kind=kinds)
def test_cross_entropy_gradients_wide(seed, N, V, kind):
    rng = np.random.default_rng(seed)
    logits = draw(rng, kind, N, V)
    targets = rng.integers(0, V, N)
    targets[rng.random(N) < 0.1] = -100
    check_grads(lambda z: cross_entropy_forward(z, targets), cross_entropy_backward, {"logits": logits}, seed,
                scalar_out=True, eps=step(kind, False))


@wide
@given(seed=seeds, T=lengths, C=widths, V=st.integers(1, 50), kind=kinds)
def test_embedding_gradients_wide(seed, T, C, V, kind):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (2, T))
    check_grads(lambda t: embedding_forward(ids, t), embedding_backward, {"table": draw(rng, kind, V, C)}, seed,
                eps=step(kind, True))
