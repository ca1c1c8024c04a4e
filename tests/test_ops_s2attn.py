"""LongLoRA S2-Attn (attention_forward(..., shift_group=G)).

The independent reference is a different formulation: ordinary dense attention over the whole
sequence in PyTorch autograd, with a (T, T) mask that allows query i to see key j exactly when both
fall in the same group of the (shifted, for the upper half of the heads) sequence, j is not later
within that group (causal) and j is a real token. It never rolls or regroups anything.
"""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_peft.backend import to_host
from spectral_peft.ops import attention_backward, attention_forward
from spectral_peft.testing import GRADCHECK_RTOL, RTOL, assert_close, numerical_gradient


def allowed_mask(B, H, T, G, causal, key_padding_mask):
    """(B, H, T, T) bool: may query i see key j under S2-Attn, in the original positions."""
    s = G // 2
    allowed = np.zeros((B, H, T, T), dtype=bool)
    for h in range(H):
        shift = s if h >= H // 2 else 0
        pos = (np.arange(T) - shift) % T  # where each original position sits in the (rolled) sequence
        group, rank = pos // G, pos % G
        a = group[:, None] == group[None, :]
        if causal:
            a &= rank[None, :] <= rank[:, None]
        allowed[:, h] = a
    if key_padding_mask is not None:
        allowed &= key_padding_mask.astype(bool)[:, None, None, :]
    return allowed


def torch_dense_reference(q, k, v, allowed):
    """Dense masked attention; a row with no visible key gives 0 (the engine's convention)."""
    allowed = torch.tensor(allowed)
    any_key = allowed.any(dim=-1, keepdim=True)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~any_key, 0.0)
    return (torch.softmax(s, dim=-1) * any_key) @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("B,H,T,hd,G", [(1, 1, 4, 3, 2), (2, 3, 8, 5, 4), (2, 4, 32, 16, 8)])
def test_s2_attention_matches_dense_masked_torch(backend, causal, padded, B, H, T, hd, G):
    rng = np.random.default_rng(11)
    q, k, v, g = (rng.standard_normal((B, H, T, hd)) for _ in range(4))
    mask = None
    if padded:
        mask = np.ones((B, T), dtype=np.int64)
        mask[-1, T - T // 4 - 1:] = 0
    out, cache = attention_forward(*(backend.asarray(a) for a in (q, k, v)), causal,
                                   None if mask is None else backend.asarray(mask), shift_group=G)
    dq, dk, dv = attention_backward(backend.asarray(g), cache)
    tq, tk, tv = (torch.tensor(a, dtype=getattr(torch, backend.dtype), requires_grad=True) for a in (q, k, v))
    tout = torch_dense_reference(tq, tk, tv, allowed_mask(B, H, T, G, causal, mask))
    tout.backward(torch.tensor(g, dtype=tout.dtype))
    rtol = RTOL[backend.dtype]
    # a query alone in its causal window has dq = 0 exactly (softmax over one key): judge the
    # round-off there against the scale of all three gradients, not against 0
    grad_scale = max(float(t.abs().max()) for t in (tq.grad, tk.grad, tv.grad))
    for name, ours, theirs in (("out", out, tout), ("dq", dq, tq.grad), ("dk", dk, tk.grad), ("dv", dv, tv.grad)):
        ours = to_host(ours)
        assert ours.dtype == np.dtype(backend.dtype)
        theirs = theirs.detach().numpy()
        atol = rtol * (float(np.abs(theirs).max()) if name == "out" else grad_scale)
        assert_close(ours, theirs, name, rtol=rtol, atol=atol)


@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3), n_groups=st.integers(1, 2),
       G=st.sampled_from([2, 4]), hd=st.sampled_from([1, 3]), causal=st.booleans(), padded=st.booleans())
def test_s2_attention_gradients(seed, B, H, n_groups, G, hd, causal, padded):
    rng = np.random.default_rng(seed)
    T = n_groups * G
    q, k, v = (rng.standard_normal((B, H, T, hd)) for _ in range(3))
    mask = (rng.random((B, T)) < 0.7).astype(np.int64) if padded else None
    originals = [a.copy() for a in (q, k, v)]
    out, cache = attention_forward(q, k, v, causal, mask, shift_group=G)
    G_up = rng.standard_normal(out.shape)
    grads = attention_backward(G_up, cache)
    for a, a0 in zip((q, k, v), originals):
        assert np.array_equal(a, a0), "an input was mutated"

    def loss() -> float:
        return float(np.sum(attention_forward(q, k, v, causal, mask, shift_group=G)[0] * G_up))

    noise = 1e-9 * max(1.0, float(np.sum(np.abs(out * G_up))))
    for name, a, d in zip("qkv", (q, k, v), grads):
        num = numerical_gradient(loss, a)
        assert_close(d, num, f"d{name}", rtol=GRADCHECK_RTOL, atol=GRADCHECK_RTOL * np.abs(num).max() + noise)


def test_s2_attention_differs_from_full_attention_only_by_its_sparsity():
    """The lower half of the heads with one group (G = T) is full attention; the upper half is not."""
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((1, 2, 8, 4)) for _ in range(3))
    full, _ = attention_forward(q, k, v, True)
    s2, _ = attention_forward(q, k, v, True, shift_group=8)
    assert_close(s2[:, 0], full[:, 0], "unshifted head, one group", rtol=1e-12)
    assert not np.allclose(s2[:, 1], full[:, 1])


@pytest.mark.parametrize("G", [3, 0, 6, 16])
def test_s2_attention_rejects_bad_group(G):
    q = np.zeros((1, 2, 8, 4))
    with pytest.raises(ValueError, match=r"shift_group must be an even divisor of T = 8"):
        attention_forward(q, q, q, True, shift_group=G)
