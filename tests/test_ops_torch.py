"""Ops against PyTorch autograd, the independent implementation: forward outputs and every gradient,
float64 (rtol 1e-10) and float32 (rtol 1e-4), on every backend present (the torch side runs on the
CPU; the engine's arrays come back with to_host).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spectral_peft.backend import to_host
from spectral_peft.ops import (attention_backward, attention_forward, cross_entropy_backward, cross_entropy_forward,
                               dropout_backward, dropout_forward, embedding_backward, embedding_forward,
                               get_activation, layernorm_backward, layernorm_forward, merge_heads,
                               rmsnorm_backward, rmsnorm_forward, softmax_backward, softmax_forward, split_heads,
                               split_heads_backward)
from spectral_peft.testing import RTOL, assert_close

TORCH_ACT = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def host(rng, *shape, scale=1.0):
    return scale * rng.standard_normal(shape)


def leaf(a, dtype):
    return torch.tensor(a, dtype=getattr(torch, dtype), requires_grad=True)


def compare(backend, pairs):
    rtol = RTOL[backend.dtype]
    for name, ours, theirs in pairs:
        ours_host = to_host(ours)
        assert ours_host.dtype == np.dtype(backend.dtype), f"{name} came back as {ours_host.dtype}"
        assert_close(ours_host, theirs.detach().numpy(), name, rtol=rtol)


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 3, 7), (2, 16, 64)])
def test_layernorm_matches_torch(backend, shape):
    rng = np.random.default_rng(1)
    C = shape[-1]
    x, w, b, g = host(rng, *shape, scale=3.0) + 1.0, host(rng, C), host(rng, C), host(rng, *shape)
    y, cache = layernorm_forward(backend.asarray(x), backend.asarray(w), backend.asarray(b), 1e-5)
    dx, dw, db = layernorm_backward(backend.asarray(g), cache, backend.asarray(w))
    tx, tw, tb = (leaf(a, backend.dtype) for a in (x, w, b))
    ty = F.layer_norm(tx, (C,), tw, tb, 1e-5)
    ty.backward(torch.tensor(g, dtype=ty.dtype))
    compare(backend, [("y", y, ty), ("dx", dx, tx.grad), ("dweight", dw, tw.grad), ("dbias", db, tb.grad)])


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 3, 7), (2, 16, 64)])
def test_rmsnorm_matches_torch(backend, shape):
    rng = np.random.default_rng(2)
    C = shape[-1]
    x, w, g = host(rng, *shape), host(rng, C), host(rng, *shape)
    y, cache = rmsnorm_forward(backend.asarray(x), backend.asarray(w), 1e-6)
    dx, dw = rmsnorm_backward(backend.asarray(g), cache, backend.asarray(w))
    tx, tw = leaf(x, backend.dtype), leaf(w, backend.dtype)
    ty = F.rms_norm(tx, (C,), tw, 1e-6)
    ty.backward(torch.tensor(g, dtype=ty.dtype))
    compare(backend, [("y", y, ty), ("dx", dx, tx.grad), ("dweight", dw, tw.grad)])


@pytest.mark.parametrize("name", sorted(TORCH_ACT))
def test_activation_matches_torch(backend, name):
    rng = np.random.default_rng(3)
    x, g = host(rng, 4, 33, scale=3.0), host(rng, 4, 33)
    x[0, :5] = [-30.0, -8.0, 0.5, 8.0, 30.0]  # saturated tails
    fwd, bwd = get_activation(name)
    y, cache = fwd(backend.asarray(x))
    dx = bwd(backend.asarray(g), cache)
    tx = leaf(x, backend.dtype)
    ty = TORCH_ACT[name](tx)
    ty.backward(torch.tensor(g, dtype=ty.dtype))
    compare(backend, [("y", y, ty), ("dx", dx, tx.grad)])


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_matches_torch(backend, axis):
    rng = np.random.default_rng(4)
    x, g = host(rng, 3, 5, 17, scale=5.0), host(rng, 3, 5, 17)
    y, cache = softmax_forward(backend.asarray(x), axis)
    dx = softmax_backward(backend.asarray(g), cache)
    tx = leaf(x, backend.dtype)
    ty = torch.softmax(tx, dim=axis)
    ty.backward(torch.tensor(g, dtype=ty.dtype))
    compare(backend, [("y", y, ty), ("dx", dx, tx.grad)])


def _torch_attention(q, k, v, causal, mask):
    """Explicit attention, masked as transformers' GPT-2/BERT do: the dtype's min value, not -inf."""
    T, hd = q.shape[-2], q.shape[-1]
    s = q @ k.transpose(-1, -2) / hd ** 0.5
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & torch.tensor(mask, dtype=torch.bool)[:, None, None, :]
    s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 4), (2, 4, 32, 16)])
def test_attention_matches_torch(backend, causal, padded, shape):
    rng = np.random.default_rng(5)
    B, H, T, hd = shape
    q, k, v, g = (host(rng, *shape) for _ in range(4))
    mask = None
    if padded:
        mask = np.ones((B, T), dtype=np.int64)
        mask[-1, (T + 1) // 2:] = 0  # right padding on the last sequence: every row keeps a visible key
    out, cache = attention_forward(*(backend.asarray(a) for a in (q, k, v)), causal,
                                   None if mask is None else backend.asarray(mask))
    dq, dk, dv = attention_backward(backend.asarray(g), cache)
    tq, tk, tv = (leaf(a, backend.dtype) for a in (q, k, v))
    tout = _torch_attention(tq, tk, tv, causal, mask)
    tout.backward(torch.tensor(g, dtype=tout.dtype))
    compare(backend, [("out", out, tout), ("dq", dq, tq.grad), ("dk", dk, tk.grad), ("dv", dv, tv.grad)])
    # and torch's fused kernel with a boolean mask agrees too
    tq2, tk2, tv2 = (leaf(a, backend.dtype) for a in (q, k, v))
    allowed = torch.ones(T, T, dtype=torch.bool)
    allowed = (torch.tril(allowed) if causal else allowed)[None, None]
    if mask is not None:
        allowed = allowed & torch.tensor(mask, dtype=torch.bool)[:, None, None, :]
    sdpa = F.scaled_dot_product_attention(tq2, tk2, tv2, attn_mask=allowed)
    sdpa.backward(torch.tensor(g, dtype=sdpa.dtype))
    compare(backend, [("out (sdpa)", out, sdpa), ("dq (sdpa)", dq, tq2.grad), ("dv (sdpa)", dv, tv2.grad)])


def test_attention_fully_masked_rows_differ_from_hf_only_there(backend):
    """Left padding under a causal mask: rows with no visible key are 0 here, HF's min-value mask
    gives them a uniform average of v; every other row matches HF."""
    rng = np.random.default_rng(6)
    B, H, T, hd = 2, 2, 6, 4
    q, k, v = (host(rng, B, H, T, hd) for _ in range(3))
    mask = np.ones((B, T), dtype=np.int64)
    mask[0, :2] = 0
    out, _ = attention_forward(*(backend.asarray(a) for a in (q, k, v)), True, backend.asarray(mask))
    out = to_host(out)
    hf = _torch_attention(*(torch.tensor(a, dtype=getattr(torch, backend.dtype)) for a in (q, k, v)), True, mask).numpy()
    assert np.all(out[0, :, :2] == 0)
    assert np.all(np.abs(hf[0, :, :2]) > 0)
    assert_close(out[0, :, 2:], hf[0, :, 2:], "out, rows with a visible key", rtol=RTOL[backend.dtype])
    assert_close(out[1], hf[1], "out, unpadded sequence", rtol=RTOL[backend.dtype])


def test_split_merge_heads_match_torch(backend):
    rng = np.random.default_rng(7)
    B, T, H, hd = 2, 5, 3, 4
    x, g = host(rng, B, T, H * hd), host(rng, B, H, T, hd)
    y = split_heads(backend.asarray(x), H)
    dx = split_heads_backward(backend.asarray(g))
    tx = leaf(x, backend.dtype)
    ty = tx.view(B, T, H, hd).transpose(1, 2)  # what GPT-2's _split_heads does
    ty.backward(torch.tensor(g, dtype=ty.dtype))
    compare(backend, [("split", y, ty), ("dx", dx, tx.grad), ("merge", merge_heads(y), tx)])


def test_embedding_matches_torch(backend):
    rng = np.random.default_rng(8)
    V, C = 11, 6
    ids = rng.integers(0, V, (3, 9))
    ids[0, :4] = 2  # repeated ids accumulate
    table, g = host(rng, V, C), host(rng, 3, 9, C)
    out, cache = embedding_forward(backend.asarray(ids), backend.asarray(table))
    dtable = embedding_backward(backend.asarray(g), cache)
    tt = leaf(table, backend.dtype)
    tout = F.embedding(torch.tensor(ids), tt)
    tout.backward(torch.tensor(g, dtype=tout.dtype))
    compare(backend, [("out", out, tout), ("dtable", dtable, tt.grad)])


@pytest.mark.parametrize("n_ignored", [0, 3])
def test_cross_entropy_matches_torch(backend, n_ignored):
    rng = np.random.default_rng(9)
    N, V = 12, 37
    logits = host(rng, N, V, scale=4.0)
    targets = rng.integers(0, V, N)
    targets[rng.permutation(N)[:n_ignored]] = -100
    dloss = 0.7
    loss, cache = cross_entropy_forward(backend.asarray(logits), backend.asarray(targets))
    dlogits = cross_entropy_backward(dloss, cache)
    tl = leaf(logits, backend.dtype)
    tloss = F.cross_entropy(tl, torch.tensor(targets), ignore_index=-100)
    (dloss * tloss).backward()
    assert isinstance(loss, float)
    assert_close(np.array(loss), np.array(tloss.item()), "loss", rtol=RTOL[backend.dtype])
    compare(backend, [("dlogits", dlogits, tl.grad)])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_torch_given_the_mask(backend, p):
    """torch's generator differs from ours, so the mask is shared: y = x ⊙ m / (1 - p) in torch."""
    rng = np.random.default_rng(10)
    x, g = host(rng, 4, 33), host(rng, 4, 33)
    y, cache = dropout_forward(backend.asarray(x), p, backend.rng(11), True)
    dx = dropout_backward(backend.asarray(g), cache)
    keep = torch.tensor(to_host(cache[0]))
    tx = leaf(x, backend.dtype)
    ty = tx * keep / (1 - p)
    ty.backward(torch.tensor(g, dtype=ty.dtype))
    compare(backend, [("y", y, ty), ("dx", dx, tx.grad)])


def test_attention_dropout_matches_torch_given_the_mask(backend):
    """HF's eager attention: P = softmax(S); out = dropout(P) v. The mask is shared with torch."""
    rng = np.random.default_rng(12)
    B, H, T, hd, p = 2, 3, 9, 4, 0.25
    q, k, v, g = (host(rng, B, H, T, hd) for _ in range(4))
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, 6:] = 0
    out, cache = attention_forward(*(backend.asarray(a) for a in (q, k, v)), True, backend.asarray(mask),
                                   dropout_p=p, rng=backend.rng(13))
    dq, dk, dv = attention_backward(backend.asarray(g), cache)
    keep = torch.tensor(to_host(cache[1][4][0]))
    tq, tk, tv = (leaf(a, backend.dtype) for a in (q, k, v))
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & torch.tensor(mask, dtype=torch.bool)[:, None, None, :]
    s = (tq @ tk.transpose(-1, -2) / hd ** 0.5).masked_fill(~allowed, torch.finfo(tq.dtype).min)
    tout = (torch.softmax(s, dim=-1) * keep / (1 - p)) @ tv
    tout.backward(torch.tensor(g, dtype=tout.dtype))
    compare(backend, [("out", out, tout), ("dq", dq, tq.grad), ("dk", dk, tk.grad), ("dv", dv, tv.grad)])
