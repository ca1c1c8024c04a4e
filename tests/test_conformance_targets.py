"""The two conformance targets shipped in the package (spectral_peft/conformance/targets/).

torch_autograd is checked against NumPy formulas written here (forward and hand-derived backward,
float64, tolerance 1e-12 relative to the array's largest magnitude), and its 4-bit quantiser bit for
bit against spectral_peft.quant.blockwise's reference, with every 4-bit code hit. peft_bnb is
checked against torch_autograd in float64 (1e-10) where both define a function; its rmsnorm and
rope compute in float32 inside transformers (a documented deviation), so those two are held to
float32's precision (1e-5) at float64 and to 1e-6 at float32.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from spectral_peft.conformance.targets import torch_autograd as TA
from spectral_peft.quant.blockwise import dequantize_4bit_reference, quantize_4bit_reference

TOL64 = 1e-12  # float64 NumPy formula vs torch autograd: a few ulps of the array's scale
TOL_PEFT = 1e-10  # peft_bnb vs torch_autograd in float64

CONTRACT = {  # the argument names of ISSUE 14's table, in order
    "lora": ["x", "weight", "bias", "lora_A", "lora_B", "scaling", "grad_output"],
    "dora": ["x", "weight", "bias", "lora_A", "lora_B", "lora_magnitude", "scaling", "grad_output"],
    "adalora": ["x", "weight", "bias", "lora_A", "lora_E", "lora_B", "scaling", "ranknum", "grad_output"],
    "rosa": ["x", "weight", "bias", "lora_A", "lora_B", "scaling", "sparse_indptr", "sparse_indices",
             "sparse_values", "grad_output"],
    "attention": ["q", "k", "v", "causal", "key_padding_mask", "grad_output"],
    "rmsnorm": ["x", "weight", "eps", "grad_output"],
    "rope": ["x", "position_ids", "inv_freq", "grad_output"],
    "swiglu": ["gate", "up", "grad_output"],
    "cross_entropy": ["logits", "labels", "grad_output"],
    "quantize_4bit": ["weight", "blocksize", "quant_type"],
    "dequantize_4bit": ["packed", "absmax", "blocksize", "quant_type", "shape"],
    "adalora_budget": ["step", "init_budget", "target_budget", "tinit", "tfinal", "total_step"],
}


def rel_err(got, want):
    """max |got − want| / max(max |want|, 1e-300): the scale-relative error of a whole array."""
    want = np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(got, dtype=np.float64) - want)) / max(np.max(np.abs(want)), 1e-300))


def assert_close(out, want, tol):
    assert set(out) == set(want), (sorted(out), sorted(want))
    for name in want:
        assert out[name].shape == np.shape(want[name]), (name, out[name].shape, np.shape(want[name]))
        err = rel_err(out[name], want[name])
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


@pytest.fixture
def rng():
    return np.random.default_rng(20261204)


def linear_case(rng, N=5, d_in=7, d_out=4, r=2, bias=True):
    f = rng.standard_normal
    return dict(x=f((N, d_in)), weight=f((d_out, d_in)), bias=f(d_out) if bias else None,
                lora_A=f((r, d_in)), lora_B=f((d_out, r)), scaling=0.75, grad_output=f((N, d_out)))


def test_signatures_are_the_contract():
    for name, args in CONTRACT.items():
        params = inspect.signature(getattr(TA, name)).parameters
        assert list(params) == args, name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()), name


# --- adapters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r", [1, 3])
def test_lora(rng, bias, r):
    c = linear_case(rng, r=r, bias=bias)
    x, W, A, B, s, dy = c["x"], c["weight"], c["lora_A"], c["lora_B"], c["scaling"], c["grad_output"]
    y = x @ W.T + s * (x @ A.T) @ B.T + (c["bias"] if bias else 0)
    want = {"output": y, "grad_x": dy @ W + s * (dy @ B) @ A,
            "grad_lora_A": s * (dy @ B).T @ x, "grad_lora_B": s * dy.T @ (x @ A.T)}
    assert_close(TA.lora(**c), want, TOL64)


@pytest.mark.parametrize("bias", [True, False])
def test_dora(rng, bias):
    c = linear_case(rng, bias=bias)
    x, W, A, B, s, dy = c["x"], c["weight"], c["lora_A"], c["lora_B"], c["scaling"], c["grad_output"]
    m = rng.uniform(0.5, 2.0, W.shape[0])
    n = np.sqrt(((W + s * B @ A) ** 2).sum(axis=1))  # a constant in backward (detached)
    g = m / n
    v = x @ W.T + s * (x @ A.T) @ B.T
    dv = dy * g
    want = {"output": g * v + (c["bias"] if bias else 0), "grad_x": dv @ W + s * (dv @ B) @ A,
            "grad_lora_A": s * (dv @ B).T @ x, "grad_lora_B": s * dv.T @ (x @ A.T),
            "grad_lora_magnitude": (dy * v).sum(axis=0) / n}
    assert_close(TA.dora(**c, lora_magnitude=m), want, TOL64)


def test_adalora(rng):
    c = linear_case(rng, r=3)
    x, W, A, B, s, dy = c["x"], c["weight"], c["lora_A"], c["lora_B"], c["scaling"], c["grad_output"]
    E = rng.standard_normal((3, 1))
    ranknum = 3.0
    k = s / (ranknum + 1e-5)
    AE = A * E
    dAE = k * (dy @ B).T @ x
    want = {"output": x @ W.T + c["bias"] + k * (x @ AE.T) @ B.T, "grad_x": dy @ W + k * (dy @ B) @ AE,
            "grad_lora_A": dAE * E, "grad_lora_E": (dAE * A).sum(axis=1, keepdims=True),
            "grad_lora_B": k * dy.T @ (x @ AE.T)}
    assert_close(TA.adalora(**c, lora_E=E, ranknum=ranknum), want, TOL64)


def test_rosa(rng):
    c = linear_case(rng, d_out=4, d_in=7)
    x, W, A, B, s, dy = c["x"], c["weight"], c["lora_A"], c["lora_B"], c["scaling"], c["grad_output"]
    # rows 0: 2 entries, 1: none, 2: 1, 3: 3
    indptr = np.array([0, 2, 2, 3, 6], dtype=np.int64)
    indices = np.array([1, 5, 0, 2, 3, 6], dtype=np.int64)
    values = rng.standard_normal(6)
    rows = np.array([0, 0, 2, 3, 3, 3])
    S = np.zeros_like(W)
    S[rows, indices] = values
    dS = dy.T @ x
    want = {"output": x @ (W + S).T + c["bias"] + s * (x @ A.T) @ B.T, "grad_x": dy @ (W + S) + s * (dy @ B) @ A,
            "grad_lora_A": s * (dy @ B).T @ x, "grad_lora_B": s * dy.T @ (x @ A.T),
            "grad_sparse_values": dS[rows, indices]}
    out = TA.rosa(**c, sparse_indptr=indptr, sparse_indices=indices, sparse_values=values)
    assert_close(out, want, TOL64)


# --- LLaMA ops -----------------------------------------------------------------------------------
def attention_numpy(q, k, v, causal, mask, dout):
    """Loop-per-head reference: (out, dq, dk, dv); a row with no visible key gives 0 (the target's rule)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // G], v[b, h // G]
            S = q[b, h] @ kh.T / np.sqrt(D)
            allowed = np.ones((T, T), dtype=bool)
            if causal:
                allowed &= np.tri(T, dtype=bool)
            if mask is not None:
                allowed &= mask[b][None, :]
            S = np.where(allowed, S, -np.inf)
            P = np.zeros_like(S)
            seen = allowed.any(axis=1)
            E = np.exp(S[seen] - S[seen].max(axis=1, keepdims=True))
            P[seen] = E / E.sum(axis=1, keepdims=True)
            out[b, h] = P @ vh
            dP = dout[b, h] @ vh.T
            dS = P * (dP - (P * dP).sum(axis=1, keepdims=True))
            dq[b, h] = dS @ kh / np.sqrt(D)
            dk[b, h // G] += dS.T @ q[b, h] / np.sqrt(D)
            dv[b, h // G] += P.T @ dout[b, h]
    return {"output": out, "grad_q": dq, "grad_k": dk, "grad_v": dv}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H,Hkv", [(2, 2), (4, 2), (3, 1)])
def test_attention(rng, causal, H, Hkv):
    B, T, D = 2, 4, 5
    q = rng.standard_normal((B, H, T, D)) * 3
    k, v = rng.standard_normal((B, Hkv, T, D)) * 3, rng.standard_normal((B, Hkv, T, D))
    dout = rng.standard_normal((B, H, T, D))
    # batch 0: left padding (under causal, query 0 sees no key); batch 1: right padding
    mask = np.array([[False, True, True, True], [True, True, True, False]])
    for m in (None, mask):
        out = TA.attention(q=q, k=k, v=v, causal=causal, key_padding_mask=m, grad_output=dout)
        assert_close(out, attention_numpy(q, k, v, causal, m, dout), TOL64)


def test_attention_large_scores_and_fully_padded_row(rng):
    """Scores of 1e4 (exp overflows without max-subtraction) and a sequence with no key at all: the
    padded sequence's output and gradients are 0 and never nan."""
    q = rng.standard_normal((2, 2, 3, 4)) * 100
    k, v = rng.standard_normal((2, 1, 3, 4)) * 100, rng.standard_normal((2, 1, 3, 4))
    dout = rng.standard_normal((2, 2, 3, 4))
    mask = np.array([[True, True, True], [False, False, False]])
    out = TA.attention(q=q, k=k, v=v, causal=False, key_padding_mask=mask, grad_output=dout)
    assert all(np.isfinite(a).all() for a in out.values())
    assert not out["output"][1].any() and not out["grad_k"][1].any() and not out["grad_v"][1].any()
    assert_close(out, attention_numpy(q, k, v, False, mask, dout), TOL64)


def test_rmsnorm(rng):
    x = rng.standard_normal((4, 6))
    x[1] *= 1e-4  # a near-zero row, where eps matters
    w, dy, eps = rng.standard_normal(6), rng.standard_normal((4, 6)), 1e-6
    r = 1 / np.sqrt((x ** 2).mean(axis=1, keepdims=True) + eps)
    xh = x * r
    dxh = dy * w
    want = {"output": w * xh, "grad_weight": (dy * xh).sum(axis=0),
            "grad_x": r * (dxh - xh * (dxh * xh).mean(axis=1, keepdims=True))}
    assert_close(TA.rmsnorm(x=x, weight=w, eps=eps, grad_output=dy), want, TOL64)


def test_rope(rng):
    B, H, T, D = 2, 3, 4, 8
    x, dy = rng.standard_normal((B, H, T, D)), rng.standard_normal((B, H, T, D))
    pos = np.array([[0, 1, 2, 3], [5, 9, 100, 2047]], dtype=np.int64)
    inv_freq = 10000.0 ** (-np.arange(0, D, 2) / D)
    ang = pos[..., None] * inv_freq  # (B, T, D/2)
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]  # (B, 1, T, D/2)
    x1, x2, d1, d2 = x[..., :4], x[..., 4:], dy[..., :4], dy[..., 4:]
    want = {"output": np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1),
            "grad_x": np.concatenate([d1 * c + d2 * s, d2 * c - d1 * s], axis=-1)}
    assert_close(TA.rope(x=x, position_ids=pos, inv_freq=inv_freq, grad_output=dy), want, TOL64)


def test_swiglu(rng):
    g, u, dy = rng.standard_normal((3, 5)) * 4, rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    sig = 1 / (1 + np.exp(-g))
    want = {"output": g * sig * u, "grad_up": dy * g * sig, "grad_gate": dy * u * (sig + g * sig * (1 - sig))}
    assert_close(TA.swiglu(gate=g, up=u, grad_output=dy), want, TOL64)


def test_cross_entropy(rng):
    z = rng.standard_normal((5, 7)) * 50  # exp(50·…) overflows a naive softmax's sum in float32
    labels = np.array([3, -100, 0, 6, -100], dtype=np.int64)
    go = np.array(0.7)
    kept = labels != -100
    zk = z[kept]
    lse = zk.max(axis=1) + np.log(np.exp(zk - zk.max(axis=1, keepdims=True)).sum(axis=1))
    loss = (lse - zk[np.arange(3), labels[kept]]).mean()
    grad = np.zeros_like(z)
    p = np.exp(zk - lse[:, None])
    p[np.arange(3), labels[kept]] -= 1
    grad[kept] = go * p / 3
    out = TA.cross_entropy(logits=z, labels=labels, grad_output=go)
    assert out["output"].shape == ()
    assert_close(out, {"output": loss, "grad_logits": grad}, TOL64)


def test_cross_entropy_all_ignored_is_zero(rng):
    out = TA.cross_entropy(logits=rng.standard_normal((2, 3)), labels=np.array([-100, -100]), grad_output=np.array(1.0))
    assert out["output"] == 0.0 and not out["grad_logits"].any()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_keeps_dtype(rng, dtype):
    c = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in linear_case(rng).items()}
    out = TA.lora(**c)
    assert all(a.dtype == dtype for a in out.values())
    want = TA.lora(**linear_case(np.random.default_rng(20261204)))  # the same draws in float64
    tol = 1e-2 if dtype == np.float16 else 1e-5
    assert_close({k: a.astype(np.float64) for k, a in out.items()}, want, tol)
    x = rng.standard_normal((3, 8)).astype(dtype) * dtype(1e-3)  # x² is subnormal in float16
    r = TA.rmsnorm(x=x, weight=np.ones(8, dtype), eps=1e-6, grad_output=np.ones((3, 8), dtype))
    x64 = x.astype(np.float64)
    assert r["output"].dtype == dtype
    assert rel_err(r["output"], x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-6)) <= tol


# --- 4-bit quantisation --------------------------------------------------------------------------
def every_code_weight(quant_type, rng):
    """(n,) float32, n odd, a partial last block, every one of the 16 codes hit in each block: the
    codebook values themselves (and, for fp4's second zero, a tiny positive value) times absmax."""
    from spectral_peft.quant.codebooks import get_4bit_code  # the engine's table, for the inputs only

    code = get_4bit_code(quant_type).astype(np.float32)
    vals = code.copy()
    if quant_type == "fp4":
        vals[8] = 1e-3  # between +0 (code 0) and the first subnormal, nearer 0: code 8
    blocks = [rng.permutation(np.concatenate([vals, rng.uniform(-1, 1, 16)])) * np.float32(s)
              for s in (1.0, 3e-3, 250.0)]
    tail = rng.permutation(vals)[:13] * np.float32(7.0)  # 13 elements: partial block, odd n
    return np.concatenate(blocks + [tail]).astype(np.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_bit_for_bit(rng, quant_type):
    w = every_code_weight(quant_type, rng)  # 3 full blocks of 32 + 13
    out = TA.quantize_4bit(weight=w, blocksize=32, quant_type=quant_type)
    packed, absmax = quantize_4bit_reference(w, 32, quant_type)
    assert out["packed"].dtype == np.uint8 and out["packed"].shape == ((w.size + 1) // 2, 1)
    assert np.array_equal(out["packed"].reshape(-1), packed)
    assert out["absmax"].dtype == np.float32 and np.array_equal(out["absmax"].view(np.uint32), absmax.view(np.uint32))
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:w.size]
    assert set(codes.tolist()) == set(range(16))
    deq = TA.dequantize_4bit(packed=out["packed"], absmax=out["absmax"], blocksize=32, quant_type=quant_type,
                             shape=w.shape)["weight"]
    ref = dequantize_4bit_reference(packed, absmax, 32, quant_type, w.size)
    assert deq.dtype == np.float32 and np.array_equal(deq.view(np.uint32), ref.view(np.uint32))


def test_quantize_4bit_midpoint_ties_and_zero_blocks():
    from spectral_peft.quant.codebooks import sorted_4bit_code

    values, order, mid = sorted_4bit_code("nf4")
    w = np.concatenate([np.float32([1.0]), mid, np.zeros(64 - 16, np.float32), np.zeros(64, np.float32),
                        np.zeros(5, np.float32)])
    out = TA.quantize_4bit(weight=w, blocksize=64, quant_type="nf4")
    packed, absmax = quantize_4bit_reference(w, 64, "nf4")
    assert np.array_equal(out["packed"].reshape(-1), packed)
    assert np.array_equal(out["absmax"], absmax) and out["absmax"][1] == 0 and out["absmax"][2] == np.float32(1e-38)


def test_adalora_budget():
    kw = dict(init_budget=96, target_budget=24, tinit=10, tfinal=20, total_step=100)
    # (43/70)³ · 72 + 24 = 40.69 -> 40; boundaries: step <= tinit is init, step > T − tfinal is target
    expect = {0: 96, 10: 96, 37: 40, 80: int(72 * (1 - 70 / 70) ** 3 + 24), 81: 24, 100: 24,
              11: int(72 * (1 - 1 / 70) ** 3 + 24)}
    for step, b in expect.items():
        out = TA.adalora_budget(step=step, **kw)["budget"]
        assert out.shape == () and out.dtype.kind == "i" and int(out) == b, (step, int(out), b)
    assert expect[11] == 92  # 72 · (69/70)³ = 68.96 -> 92.96 truncated


# --- peft_bnb against torch_autograd -------------------------------------------------------------
@pytest.fixture(scope="module")
def PB():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from spectral_peft.conformance.targets import peft_bnb

    return peft_bnb


@pytest.mark.parametrize("bias", [True, False])
def test_peft_lora_dora_adalora_match(PB, rng, bias):
    c = linear_case(rng, r=2, bias=bias)
    assert_close(PB.lora(**c), TA.lora(**c), TOL_PEFT)
    m = rng.uniform(0.5, 2.0, c["weight"].shape[0])
    assert_close(PB.dora(**c, lora_magnitude=m), TA.dora(**c, lora_magnitude=m), TOL_PEFT)
    E = rng.standard_normal((2, 1))
    assert_close(PB.adalora(**c, lora_E=E, ranknum=2.0), TA.adalora(**c, lora_E=E, ranknum=2.0), TOL_PEFT)


def test_peft_rmsnorm_rope_are_float32_inside(PB, rng):
    x, w, dy = rng.standard_normal((3, 8)), rng.standard_normal(8), rng.standard_normal((3, 8))
    pos, inv = np.array([[0, 3, 7]]), 10000.0 ** (-np.arange(0, 8, 2) / 8)
    xr, dyr = rng.standard_normal((1, 2, 3, 8)), rng.standard_normal((1, 2, 3, 8))
    for dt, tol in ((np.float64, 1e-5), (np.float32, 1e-6)):
        norm = dict(x=x.astype(dt), weight=w.astype(dt), eps=1e-6, grad_output=dy.astype(dt))
        assert_close(PB.rmsnorm(**norm), TA.rmsnorm(**norm), tol)
        rot = dict(x=xr.astype(dt), position_ids=pos, inv_freq=inv.astype(dt), grad_output=dyr.astype(dt))
        assert_close(PB.rope(**rot), TA.rope(**rot), tol)


def test_peft_adalora_budget_matches(PB):
    kw = dict(init_budget=120, target_budget=17, tinit=5, tfinal=13, total_step=91)
    for step in range(0, 95):
        assert int(PB.adalora_budget(step=step, **kw)["budget"]) == int(TA.adalora_budget(step=step, **kw)["budget"])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_quantize_matches(PB, rng, quant_type):
    pytest.importorskip("bitsandbytes")
    w = every_code_weight(quant_type, rng)
    for fn in ("quantize_4bit",):
        a, b = getattr(TA, fn)(weight=w, blocksize=32, quant_type=quant_type), \
            getattr(PB, fn)(weight=w, blocksize=32, quant_type=quant_type)
        assert a["packed"].shape == b["packed"].shape and np.array_equal(a["packed"], b["packed"])
        assert np.array_equal(a["absmax"].view(np.uint32), b["absmax"].view(np.uint32))
    args = dict(a, blocksize=32, quant_type=quant_type, shape=w.shape)
    da, db = TA.dequantize_4bit(**args)["weight"], PB.dequantize_4bit(**args)["weight"]
    assert da.shape == db.shape == w.shape and np.array_equal(da.view(np.uint32), db.view(np.uint32))
