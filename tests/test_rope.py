"""The LLaMA-family ops: RoPE (every rope type, partial rotary), SwiGLU, grouped-query attention with
a KV-cache offset and Mistral's sliding window. Each: float64 central differences and PyTorch
parity (float64 <= 1e-10, float32 <= 1e-4), frequencies against transformers' own init functions."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.ops.activation import swiglu_backward, swiglu_forward
from spectral_peft.ops.attention import attention_backward, attention_forward
from spectral_peft.ops.rope import rope_backward, rope_cos_sin, rope_forward, rope_init
from spectral_peft.testing import assert_close, numerical_gradient

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
}


def _hf_inv_freq(params, head_dim, max_pos, seq_len=None):
    """transformers' own frequencies (float32, its dtype) for these rope_parameters."""
    cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                   max_position_embeddings=max_pos, rope_parameters=dict(params))
    if params["rope_type"] == "default":
        inv, a = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, a = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, None, seq_len=seq_len)
    return inv.numpy(), a


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_init_matches_transformers(name):
    """Frequencies and attention scaling equal transformers' to its float32 rounding (it computes
    them in float32; the engine in float64)."""
    params, hd, L = ROPES[name], 16, 64
    inv, a = rope_init(params, hd, L)
    hf_inv, hf_a = _hf_inv_freq(params, hd, L)
    assert_close(inv, hf_inv.astype(np.float64), f"inv_freq ({name})", rtol=1e-6)
    assert abs(a - hf_a) <= 1e-12 * abs(hf_a), f"attention_scaling ({name}): {a} vs {hf_a}"
    if name == "dynamic":  # past the trained length the base grows
        inv2, _ = rope_init(params, hd, L, seq_len=3 * L)
        assert_close(inv2, _hf_inv_freq(params, hd, L, seq_len=3 * L)[0], "inv_freq (dynamic, 3L)", rtol=1e-6)
        assert np.all(inv2[1:] < inv[1:])


def test_rope_init_refuses_unknown_types_and_keys():
    with pytest.raises(ValueError, match=r"rope_type = 'longrope' is not supported"):
        rope_init({"rope_type": "longrope", "rope_theta": 1e4}, 8, 32)
    with pytest.raises(ValueError, match=r"rope_parameters.factor is required"):
        rope_init({"rope_type": "linear", "rope_theta": 1e4}, 8, 32)
    with pytest.raises(ValueError, match=r"rope_parameters.low_freq_factor is not used by rope_type 'linear'"):
        rope_init({"rope_type": "linear", "rope_theta": 1e4, "factor": 2, "low_freq_factor": 1}, 8, 32)
    with pytest.raises(ValueError, match="must be even"):
        rope_init({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.4}, 8, 32)


def _torch_rope(x, cos, sin):
    """HF's apply_rotary_pos_emb (rotate_half), with partial rotary as GPT-NeoX/Phi split it."""
    D = cos.shape[-1]
    xr, xp_ = x[..., :D], x[..., D:]
    x1, x2 = xr[..., : D // 2], xr[..., D // 2:]
    rot = torch.cat((-x2, x1), dim=-1)
    return torch.cat((xr * cos[:, None] + rot * sin[:, None], xp_), dim=-1)


@settings(max_examples=15)
@given(st.sampled_from(sorted(ROPES)), st.integers(1, 2), st.integers(1, 3), st.integers(1, 5),
       st.sampled_from([(4, 1.0), (8, 1.0), (8, 0.5), (12, 1 / 3)]), st.integers(0, 2**31 - 1))
def test_rope_matches_torch_and_differences(name, B, H, T, hd_prf, seed):
    hd, prf = hd_prf
    params = {**ROPES[name], "partial_rotary_factor": prf}
    inv, a = rope_init(params, hd, 64)
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 64, (B, T))
    cos, sin = rope_cos_sin(pos, inv, a)
    x, g = rng.standard_normal((2, B, H, T, hd))
    x0 = x.copy()
    out, cache = rope_forward(x, cos, sin)
    dx = rope_backward(g, cache)
    assert np.array_equal(x, x0), "rope_forward must not write into x"
    # cos/sin against torch from the same frequencies (HF's emb = cat(freqs, freqs))
    freqs = torch.tensor(pos, dtype=torch.float64)[..., None] * torch.tensor(inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    assert_close(cos, emb.cos() * a, "cos", 1e-12)
    assert_close(sin, emb.sin() * a, "sin", 1e-12)
    tx = torch.tensor(x, requires_grad=True)
    tout = _torch_rope(tx, torch.tensor(cos), torch.tensor(sin))
    tout.backward(torch.tensor(g))
    assert_close(out, tout.detach().numpy(), "rope out", 1e-12)
    assert_close(dx, tx.grad.numpy(), "rope dx", 1e-12)
    num = numerical_gradient(lambda: float(np.sum(rope_forward(x, cos, sin)[0] * g)), x)
    assert_close(dx, num, "rope dx (central differences)", 1e-6)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_swiglu_matches_torch_and_differences(dtype):
    rng = np.random.default_rng(0)
    gate, up, g = (rng.standard_normal((3, 7, 5)) * 3).astype(dtype)
    y, cache = swiglu_forward(gate, up)
    dgate, dup = swiglu_backward(g, cache)
    tg, tu = (torch.tensor(a, requires_grad=True) for a in (gate, up))
    ty = torch.nn.functional.silu(tg) * tu
    ty.backward(torch.tensor(g))
    rtol = 1e-10 if dtype == "float64" else 1e-4
    for name, a, b in (("y", y, ty), ("dgate", dgate, tg.grad), ("dup", dup, tu.grad)):
        assert a.dtype == np.dtype(dtype)
        assert_close(a, b.detach().numpy(), f"swiglu {name}", rtol)
    if dtype == "float64":
        f = lambda: float(np.sum(swiglu_forward(gate, up)[0] * g))  # noqa: E731
        assert_close(dgate, numerical_gradient(f, gate), "dgate (central differences)", 1e-6)
        assert_close(dup, numerical_gradient(f, up), "dup (central differences)", 1e-6)


def _torch_gqa(q, k, v, Tq, Tk, mask, window):
    """repeat_kv + explicit masked softmax, HF's eager attention in float64."""
    G = q.shape[1] // k.shape[1]
    k, v = (a.repeat_interleave(G, dim=1) for a in (k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    pos = torch.arange(Tq)[:, None] + Tk - Tq
    j = torch.arange(Tk)[None, :]
    allowed = j <= pos
    if window is not None:
        allowed &= j > pos - window
    allowed = allowed[None, None] & torch.tensor(mask, dtype=torch.bool)[:, None, None, :]
    s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1) @ v


@settings(max_examples=20)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(0, 5),
       st.sampled_from([None, 1, 2, 3]), st.booleans(), st.integers(0, 2**31 - 1))
def test_gqa_cached_window_attention_matches_torch(B, Hkv, G, Tq, extra, window, pad, seed):
    """Hkv key/value heads shared by G query heads, Tq <= Tk queries at the end, sliding window,
    right padding on the keys: output, dq, dk, dv against torch (float64) and central differences."""
    rng = np.random.default_rng(seed)
    Tk, hd, H = Tq + extra, 4, Hkv * G
    q, dout = rng.standard_normal((2, B, H, Tq, hd))
    k, v = rng.standard_normal((2, B, Hkv, Tk, hd))
    mask = np.ones((B, Tk), dtype=np.int64)
    if pad and extra:
        mask[0, :extra] = 0  # left padding among the cached keys; every query keeps its own key
    out, cache = attention_forward(q, k, v, True, mask, sliding_window=window)
    dq, dk, dv = attention_backward(dout, cache)
    assert dk.shape == k.shape and dv.shape == v.shape and dq.shape == q.shape
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tout = _torch_gqa(tq, tk, tv, Tq, Tk, mask, window)
    tout.backward(torch.tensor(dout))
    for name, a, b in (("out", out, tout), ("dq", dq, tq.grad), ("dk", dk, tk.grad), ("dv", dv, tv.grad)):
        # a single visible key gives dq = 0 exactly in torch, a rounding residue here: atol at O(1) inputs
        assert_close(a, b.detach().numpy(), f"GQA {name}", 1e-10, atol=1e-13)
    f = lambda: float(np.sum(attention_forward(q, k, v, True, mask, sliding_window=window)[0] * dout))  # noqa: E731
    for name, a, d in (("q", q, dq), ("k", k, dk), ("v", v, dv)):
        assert_close(d, numerical_gradient(f, a), f"GQA d{name} (central differences)", 1e-6, atol=1e-8)


def test_gqa_float32_matches_torch():
    rng = np.random.default_rng(1)
    q, dout = rng.standard_normal((2, 2, 6, 5, 8)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 2, 5, 8)).astype(np.float32)
    mask = np.ones((2, 5), dtype=np.int64)
    out, cache = attention_forward(q, k, v, True, mask)
    dq, dk, dv = attention_backward(dout, cache)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
    tout.backward(torch.tensor(dout))
    for name, a, b in (("out", out, tout), ("dq", dq, tq.grad), ("dk", dk, tk.grad), ("dv", dv, tv.grad)):
        assert a.dtype == np.float32
        assert_close(a, b.detach().numpy(), f"GQA float32 {name}", 1e-4)


def test_attention_refuses_bad_groups_and_offsets():
    q = np.zeros((1, 3, 2, 4))
    with pytest.raises(ValueError, match="H = 3 must be a multiple of k's Hkv = 2"):
        attention_forward(q, np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2, 4)), True)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        attention_forward(q, np.zeros((1, 3, 1, 4)), np.zeros((1, 3, 1, 4)), True)
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        attention_forward(q, q, q, True, sliding_window=0)
