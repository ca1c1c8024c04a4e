"""Causal attention by query blocks (ops/attention.py, causal_query_blocks): a training forward of
T > QUERY_BLOCK tokens is taken block by block, each block's queries against the keys up to its
last query. Against the one-block path (the block size raised above T): the same outputs and
gradients within rounding (the row sums and P v skip the removed zeros, so their summation order
differs): float64 to 1e-12, float32 to 1e-5, relative to each tensor's largest entry; the blocked
gradients also pass the float64 central-difference check."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.backend import get_backend, to_device, to_host
from spectral_peft.ops import attention as attn
from spectral_peft.ops.attention import attention_backward, attention_forward, causal_query_blocks
from spectral_peft.testing import assert_close

from _gradcheck import check_grads

TOL = {np.float64: 1e-12, np.float32: 1e-5}


def _run(q, k, v, dout, block, **kw):
    """(out, dq, dk, dv, cache kind) with QUERY_BLOCK = ``block``."""
    saved = attn.QUERY_BLOCK
    attn.QUERY_BLOCK = block
    try:
        out, cache = attention_forward(q, k, v, True, **kw)
        dq, dk, dv = attention_backward(dout, cache)
    finally:
        attn.QUERY_BLOCK = saved
    return out, dq, dk, dv, cache[0]


def _compare(q, k, v, block, dtype, **kw):
    rng = np.random.default_rng(11)
    dout = rng.standard_normal(q.shape).astype(dtype)
    *blocked, kind_b = _run(q, k, v, dout, block, **kw)
    *whole, kind_w = _run(q, k, v, dout, 10 ** 9, **kw)
    assert kind_b == "blocks" and kind_w == "full"
    tol = TOL[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), blocked, whole):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}"
        scale = max(1.0, float(np.max(np.abs(b))))
        assert_close(a, b, f"blocked {name}", rtol=tol, atol=tol * scale)


def _qkv(rng, B, H, Hkv, T, hd, dtype):
    q = rng.standard_normal((B, H, T, hd)).astype(dtype)
    k, v = (rng.standard_normal((B, Hkv, T, hd)).astype(dtype) for _ in range(2))
    return q, k, v


def test_blocks_cover_every_query_once():
    assert causal_query_blocks(128, 128, True, block=128) is None  # T <= block: one block
    assert causal_query_blocks(300, 300, True, block=128) == [(0, 128), (128, 256), (256, 300)]
    assert causal_query_blocks(300, 300, False, block=128) is None  # no causal mask: nothing is skipped
    assert causal_query_blocks(3, 300, True, block=1) is None  # cached decoding (Tq != Tk)
    assert causal_query_blocks(300, 300, True, 0.1, block=128) is None  # attention dropout: one mask draw


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", ["causal", "grouped", "padding", "window"])
def test_blocked_equals_one_block(dtype, case):
    rng = np.random.default_rng(5)
    H, Hkv = (4, 2) if case == "grouped" else (3, 3)
    q, k, v = _qkv(rng, 2, H, Hkv, 23, 8, dtype)
    kw = {}
    if case == "padding":
        kpm = np.ones((2, 23), dtype=np.int64)
        kpm[0, 17:] = 0  # right padding
        kpm[1, :9] = 0  # left padding: the first rows see no key, P = 0 there in both paths
        kw["key_padding_mask"] = kpm
    if case == "window":
        kw["sliding_window"] = 6
    _compare(q, k, v, 5, dtype, **kw)  # blocks of 5: the last one holds 3 queries


@settings(deadline=None)
@given(T=st.integers(2, 40), block=st.integers(1, 16), hd=st.integers(1, 6), G=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2 ** 16))
def test_blocked_equals_one_block_property(T, block, hd, G, seed):
    if T <= block:
        block = max(1, T - 1)
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, 1, 2 * G, 2, T, hd, np.float64)
    _compare(q, k, v, block, np.float64)


def test_blocked_gradients_central_differences():
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, 1, 2, 1, 7, 3, np.float64)
    saved = attn.QUERY_BLOCK
    attn.QUERY_BLOCK = 3
    try:
        fwd = lambda q, k, v: attention_forward(q, k, v, True)  # noqa: E731
        assert fwd(q, k, v)[1][0] == "blocks"
        check_grads(fwd, attention_backward, {"q": q, "k": k, "v": v}, seed=8)
    finally:
        attn.QUERY_BLOCK = saved


def test_blocked_forward_keeps_fewer_scores():
    # the cached probabilities of T = 300 in blocks of 128: 128·128 + 128·256 + 44·300 of the 300² scores
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, 1, 1, 1, 300, 4, np.float32)
    _, cache = attention_forward(q, k, v, True)
    assert attn.QUERY_BLOCK == 128 and cache[0] == "blocks"
    kept = sum(core[3].size for _, _, (_, core) in cache[1])
    assert kept == 128 * 128 + 128 * 256 + 44 * 300


def test_blocked_on_the_emulated_device():
    # the blocked path keeps to CuPy's rules (the strict gpu-emulated backend) and equals the host's
    pytest.importorskip("cupy")
    emu = get_backend("gpu-emulated", "float64")
    rng = np.random.default_rng(13)
    q, k, v = _qkv(rng, 1, 4, 2, 11, 3, np.float64)
    dout = rng.standard_normal(q.shape)
    host = _run(q, k, v, dout, 4)
    dev = _run(*(to_device(a, emu) for a in (q, k, v, dout)), 4)
    assert dev[-1] == host[-1] == "blocks"
    for name, a, b in zip(("out", "dq", "dk", "dv"), dev[:-1], host[:-1]):
        assert_close(to_host(a), b, f"emulated blocked {name}", rtol=1e-12, atol=1e-12)
