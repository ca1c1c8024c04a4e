"""The attention's mask added in place as a -∞/0 bias: the same probabilities, bit for bit, as
writing -∞ into the removed scores (the operations before it, q·(1/√hd) then @ kᵀ, and after it
are unchanged, so the reference below repeats them with the removal done by np.where)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from spectral_peft.ops.attention import attention_backward, attention_forward


def _reference_P(q, k, masked):
    """softmax with the removed scores overwritten by -∞ (np.where), fully masked rows -> 0,
    the same operation order as the engine: (q·scale) @ kᵀ, max, subtract, exp, row sum, divide."""
    S = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.swapaxes(-1, -2)
    S = np.where(masked, -np.inf, S).astype(q.dtype)
    m = S.max(axis=-1, keepdims=True)
    m[m == -np.inf] = 0.0
    E = np.exp(S - m)
    d = (E @ np.ones(S.shape[-1], dtype=S.dtype))[..., None]
    d[d == 0] = 1.0
    return E / d


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal,pad", [(True, False), (False, True), (True, True)])
def test_mask_bias_equals_overwrite_bit_for_bit(dtype, causal, pad):
    rng = np.random.default_rng(3)
    B, H, T, hd = 2, 3, 9, 4
    q, k, v = (rng.standard_normal((B, H, T, hd)).astype(dtype) for _ in range(3))
    kpm = None
    masked = np.zeros((B, 1, T, T), dtype=bool)
    if causal:
        masked |= np.triu(np.ones((T, T), dtype=bool), k=1)
    if pad:
        kpm = np.ones((B, T), dtype=np.int64)
        kpm[0, 6:] = 0
        kpm[1, :] = 0  # every key padded: rows with no visible key give P = 0
        masked |= (kpm == 0)[:, None, None, :]
    out, cache = attention_forward(q, k, v, causal, key_padding_mask=kpm)
    P = cache[1][3]
    P_ref = _reference_P(q, k, masked)
    assert np.array_equal(P, P_ref)
    assert np.array_equal(out, P_ref @ v)
    assert np.all(P[np.broadcast_to(masked, P.shape)] == 0)
    if pad:
        assert np.all(out[1] == 0)
    dq, dk, dv = attention_backward(rng.standard_normal(out.shape).astype(dtype), cache)
    assert all(np.isfinite(a).all() for a in (dq, dk, dv))


def test_mask_bias_grouped_queries_and_cache():
    # grouped queries (H 4 on Hkv 2) and a KV cache (Tq 3 of Tk 7) under the causal mask
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 4, 3, 5))
    k, v = (rng.standard_normal((2, 2, 7, 5)) for _ in range(2))
    out, _ = attention_forward(q, k, v, True)
    kr, vr = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)  # head h reads kv head h // 2
    S = q @ kr.swapaxes(-1, -2) / math.sqrt(5)
    S[..., np.triu(np.ones((3, 7), dtype=bool), k=7 - 3 + 1)] = -np.inf  # query i at position 4 + i
    P = np.exp(S - S.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, P @ vr, rtol=1e-12, atol=1e-12)  # float64, another summation order
