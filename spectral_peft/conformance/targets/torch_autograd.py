"""A plain PyTorch-autograd implementation of every conformance contract function (docs/conformance.md).

Run it with ``spectral-peft conformance spectral_peft.conformance.targets.torch_autograd``. It is
written the way a user would write a reference in PyTorch: each forward is the textbook formula on
torch tensors, each gradient comes from ``output.backward(grad_output)``. It imports nothing from
spectral_peft, so it is an independent implementation, not the engine checked against itself.

Calling convention (the contract): keyword arguments, NumPy arrays of one float dtype (float16,
float32 or float64; indices int64, masks bool) and Python scalars; the result is a dict of NumPy
arrays in the input's float dtype, with exactly the names of the contract's "returns" column.

Shape legend: N rows, d_in, d_out, r the rank; B batch, H query heads, Hkv key/value heads
(H = G·Hkv), T sequence, D head width; V vocabulary; n quantised elements, b the block size.

Precision: every function computes in the input dtype (PyTorch 2.x runs float16 matmul, softmax,
norms and losses on CPU), with two exceptions that follow what Hugging Face's own code does:
- rmsnorm upcasts float16 input to float32 for mean(x²) and the scaling, then casts back
  (LlamaRMSNorm upcasts always; float32 and float64 stay in their own dtype here). In float16,
  x² of a near-zero row is subnormal and loses most of its digits, and of a large one overflows.
- rope builds the angles and cos/sin in float32 when the input is float16 (float64 for float64),
  then casts cos/sin to the input dtype (LlamaRotaryEmbedding computes them in float32): a
  float16 angle position · inv_freq is off by up to 2⁻¹¹ of a position in the thousands.

Edge cases:
- attention: a query row that can see no key (all its keys padding, or masked) returns 0 and
  passes no gradient (its probabilities are set to 0); the contract does not compare such rows,
  but their gradient must not reach k and v, which are compared.
- cross_entropy: when every label is -100 the mean is over zero rows; this returns 0 with zero
  gradients (torch's reduction="mean" would give nan); otherwise it is torch's mean exactly.
- quantize_4bit / dequantize_4bit are NumPy float32 (nothing to differentiate), bitsandbytes'
  conventions: packed (ceil(n/2), 1) uint8 as bitsandbytes returns it, first element in the high
  nibble; absmax (nb,) float32.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# --- helpers --------------------------------------------------------------------------------------


def _t(a, grad: bool = False):
    """NumPy array -> torch tensor (a copy, so that autograd never writes into the caller's array)."""
    t = torch.from_numpy(np.array(a, copy=True))
    return t.requires_grad_(True) if grad else t


def _np(t, dtype):
    """torch tensor -> NumPy array of ``dtype`` (a copy)."""
    return t.detach().numpy().astype(dtype, copy=True)


def _backward(output, grad_output):
    output.backward(_t(grad_output).to(output.dtype))


def _linear(x, weight, bias):
    """x Wᵀ + b: (N, d_in), (d_out, d_in), (d_out,) or None -> (N, d_out)."""
    y = x @ weight.T
    return y + bias if bias is not None else y


# --- adapters -------------------------------------------------------------------------------------


def lora(*, x, weight, bias, lora_A, lora_B, scaling, grad_output):
    """output = x Wᵀ + b + scaling·(x Aᵀ) Bᵀ: x (N, d_in), A (r, d_in), B (d_out, r) -> (N, d_out)."""
    dt = x.dtype
    X, A, B = _t(x, True), _t(lora_A, True), _t(lora_B, True)
    W, b = _t(weight), (_t(bias) if bias is not None else None)
    y = _linear(X, W, b) + scaling * ((X @ A.T) @ B.T)
    _backward(y, grad_output)
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt), "grad_lora_A": _np(A.grad, dt),
            "grad_lora_B": _np(B.grad, dt)}


def dora(*, x, weight, bias, lora_A, lora_B, lora_magnitude, scaling, grad_output):
    """PEFT's DoRA (peft/tuners/lora/dora.py, eval mode, no dropout):

        n = ||W + scaling·B A||₂ per output row (d_out,), DETACHED;  g = m / n (d_out,)
        output = base(x) + (g − 1)·(x Wᵀ) + g·scaling·(x Aᵀ) Bᵀ,   base(x) = x Wᵀ + b

    so the bias is not rescaled: output = b + g·(x Wᵀ + scaling·(x Aᵀ)Bᵀ).
    """
    dt = x.dtype
    X, A, B, m = _t(x, True), _t(lora_A, True), _t(lora_B, True), _t(lora_magnitude, True)
    W, b = _t(weight), (_t(bias) if bias is not None else None)
    n = torch.linalg.norm(W + scaling * (B @ A), dim=1).detach()  # (d_out,)
    g = m / n  # (d_out,)
    xw = X @ W.T  # (N, d_out)
    base = xw + b if b is not None else xw
    y = base + (g - 1) * xw + g * (scaling * ((X @ A.T) @ B.T))
    _backward(y, grad_output)
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt), "grad_lora_A": _np(A.grad, dt),
            "grad_lora_B": _np(B.grad, dt), "grad_lora_magnitude": _np(m.grad, dt)}


def adalora(*, x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, grad_output):
    """output = x Wᵀ + b + (x (A⊙E)ᵀ Bᵀ)·scaling/(ranknum + 1e-5): A (r, d_in), E (r, 1), B (d_out, r)."""
    dt = x.dtype
    X, A, E, B = _t(x, True), _t(lora_A, True), _t(lora_E, True), _t(lora_B, True)
    W, b = _t(weight), (_t(bias) if bias is not None else None)
    y = _linear(X, W, b) + (X @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5)
    _backward(y, grad_output)
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt), "grad_lora_A": _np(A.grad, dt),
            "grad_lora_E": _np(E.grad, dt), "grad_lora_B": _np(B.grad, dt)}


def rosa(*, x, weight, bias, lora_A, lora_B, scaling, sparse_indptr, sparse_indices, sparse_values, grad_output):
    """output = x (W + S)ᵀ + b + scaling·(x Aᵀ) Bᵀ with S (d_out, d_in) the CSR matrix
    (indptr (d_out + 1,), indices (nnz,), values (nnz,)), built densely from the values by
    index_put (duplicates summed, as CSR means); grad_sparse_values in the CSR order."""
    dt = x.dtype
    X, A, B, vals = _t(x, True), _t(lora_A, True), _t(lora_B, True), _t(sparse_values, True)
    W, b = _t(weight), (_t(bias) if bias is not None else None)
    indptr = np.asarray(sparse_indptr, dtype=np.int64)
    rows = torch.from_numpy(np.repeat(np.arange(W.shape[0], dtype=np.int64), np.diff(indptr)))
    cols = torch.from_numpy(np.asarray(sparse_indices, dtype=np.int64).copy())
    S = torch.zeros_like(W).index_put((rows, cols), vals, accumulate=True)  # (d_out, d_in)
    y = _linear(X, W + S, b) + scaling * ((X @ A.T) @ B.T)
    _backward(y, grad_output)
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt), "grad_lora_A": _np(A.grad, dt),
            "grad_lora_B": _np(B.grad, dt), "grad_sparse_values": _np(vals.grad, dt)}


# --- LLaMA ops ------------------------------------------------------------------------------------


def attention(*, q, k, v, causal, key_padding_mask, grad_output):
    """softmax(q kᵀ/√D + mask) v: q (B, H, T, D), k, v (B, Hkv, T, D) -> (B, H, T, D).

    Query head h reads key/value head h // (H/Hkv) (k, v repeated over the group). Masked scores
    are -inf: causal (key j > query i) and key_padding_mask False. A row with no visible key gets
    probabilities 0 (output 0, no gradient) instead of softmax's nan.
    """
    dt = q.dtype
    Q, K, Vv = _t(q, True), _t(k, True), _t(v, True)
    G = Q.shape[1] // K.shape[1]
    Kr, Vr = K.repeat_interleave(G, dim=1), Vv.repeat_interleave(G, dim=1)  # (B, H, T, D)
    T = Q.shape[2]
    scores = (Q @ Kr.transpose(-1, -2)) / math.sqrt(Q.shape[-1])  # (B, H, T, T)
    allowed = torch.ones(Q.shape[0], 1, T, T, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed = allowed & torch.from_numpy(np.asarray(key_padding_mask, dtype=bool).copy())[:, None, None, :]
    visible = allowed.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = torch.where(visible, scores, torch.zeros((), dtype=scores.dtype))  # no all -inf row
    P = torch.softmax(scores, dim=-1) * visible
    out = P @ Vr
    _backward(out, grad_output)
    return {"output": _np(out, dt), "grad_q": _np(Q.grad, dt), "grad_k": _np(K.grad, dt), "grad_v": _np(Vv.grad, dt)}


def rmsnorm(*, x, weight, eps, grad_output):
    """output = weight·x/√(mean(x²) + eps) over the last axis: x (N, C), weight (C,).
    float16 is computed in float32 and cast back (module docstring)."""
    dt = x.dtype
    X, w = _t(x, True), _t(weight, True)
    ct = torch.float32 if X.dtype == torch.float16 else X.dtype
    Xc = X.to(ct)
    y = (w.to(ct) * (Xc * torch.rsqrt(Xc.pow(2).mean(-1, keepdim=True) + eps))).to(X.dtype)
    _backward(y, grad_output)
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt), "grad_weight": _np(w.grad, dt)}


def _rotate_half(x):
    """cat(−x2, x1) of the two halves of the last axis."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(*, x, position_ids, inv_freq, grad_output):
    """Hugging Face's rotate_half RoPE: angles = position_ids[..., None]·inv_freq (B, T, D/2),
    emb = cat(angles, angles), cos, sin (B, 1, T, D); output = x·cos + rotate_half(x)·sin.
    x (B, H, T, D), position_ids (B, T) int64, inv_freq (D/2,)."""
    dt = x.dtype
    X = _t(x, True)
    ct = torch.float32 if X.dtype == torch.float16 else X.dtype  # HF: cos/sin in float32
    angles = torch.from_numpy(np.asarray(position_ids).copy()).to(ct)[..., None] * _t(inv_freq).to(ct)
    emb = torch.cat((angles, angles), dim=-1)  # (B, T, D)
    cos, sin = emb.cos()[:, None].to(X.dtype), emb.sin()[:, None].to(X.dtype)  # (B, 1, T, D)
    y = X * cos + _rotate_half(X) * sin
    _backward(y, grad_output)
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt)}


def swiglu(*, gate, up, grad_output):
    """output = silu(gate)·up, element-wise (any shape)."""
    dt = gate.dtype
    g, u = _t(gate, True), _t(up, True)
    y = F.silu(g) * u
    _backward(y, grad_output)
    return {"output": _np(y, dt), "grad_gate": _np(g.grad, dt), "grad_up": _np(u.grad, dt)}


def cross_entropy(*, logits, labels, grad_output):
    """Mean over the rows with label != -100 of logsumexp(z) − z[label]: logits (N, V), labels (N,)
    -> output 0-d; grad_output is 0-d. No kept row: 0 and zero gradients (module docstring)."""
    dt = logits.dtype
    Z = _t(logits, True)
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    if bool((lab != -100).any()):
        loss = F.cross_entropy(Z, lab, ignore_index=-100, reduction="mean")
    else:
        loss = (Z * 0).sum()
    _backward(loss, grad_output)
    return {"output": _np(loss, dt).reshape(()), "grad_logits": _np(Z.grad, dt)}


# --- 4-bit quantisation (bitsandbytes' conventions, NumPy float32) ----------------------------------

# NF4 (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes' table), index = 4-bit code.
_NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
# FP4 (E2M1) in bitsandbytes' bit-pattern order: sign bit 8; code 8 is +0 (bitsandbytes writes -0
# as an integer); divided by the largest magnitude, 12, in float32.
_FP4 = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32)
        / np.float32(12))
_CODES = {"nf4": _NF4, "fp4": _FP4}
_FLOOR = np.float32(1e-38)  # bitsandbytes clamps absmax to >= 1e-38 before scaling
PACKED_SHAPE_2D = True  # packed is returned (ceil(n/2), 1), as bitsandbytes.functional.quantize_4bit


def quantize_4bit(*, weight, blocksize, quant_type):
    """weight (n,) float32 -> packed (ceil(n/2), 1) uint8, absmax (ceil(n/b),) float32.

    absmax_j = max |x| of block j (the last block may be partial; its stored value is clamped to
    >= 1e-38). s = clamp(x · fl32(1/max(absmax_j, 1e-38)), −1, 1) in a full block; the partial last
    block divides instead (bitsandbytes' CPU backend). The code is the nearest codebook value, an
    exact midpoint going to the lower value: sorted index = #{midpoints < s}, midpoints
    (v_k + v_{k+1})/2 in float32 of the stably sorted codebook, mapped back to the bit pattern.
    Byte i = code[2i] << 4 | code[2i+1]; an odd n is padded with s = 0.
    """
    code = _CODES[quant_type]
    x = np.asarray(weight, dtype=np.float32).reshape(-1)
    n = x.size
    nb, full = -(-n // blocksize), n - n % blocksize
    absmax = np.empty(nb, dtype=np.float32)
    s = np.zeros(n + n % 2, dtype=np.float32)
    for j in range(nb):
        block = x[j * blocksize:(j + 1) * blocksize]
        amax = np.abs(block).max()
        if j * blocksize < full:
            absmax[j] = amax
            s[j * blocksize:j * blocksize + block.size] = block * (np.float32(1) / max(amax, _FLOOR))
        else:
            absmax[j] = max(amax, _FLOOR)
            s[j * blocksize:j * blocksize + block.size] = block / absmax[j]
    np.clip(s, np.float32(-1), np.float32(1), out=s)
    order = np.argsort(code, kind="stable")
    v = code[order]
    midpoints = (v[:-1] + v[1:]) / np.float32(2)
    q = order[np.searchsorted(midpoints, s, side="left")].astype(np.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
    return {"packed": packed.reshape(-1, 1) if PACKED_SHAPE_2D else packed, "absmax": absmax}


def dequantize_4bit(*, packed, absmax, blocksize, quant_type, shape):
    """packed uint8 (any shape, ceil(n/2) bytes, high nibble first), absmax (nb,) float32 ->
    weight of ``shape`` float32 = code[q] · absmax_j, one float32 product."""
    n = int(np.prod(shape))
    flat = np.asarray(packed, dtype=np.uint8).reshape(-1)
    q = np.empty(2 * flat.size, dtype=np.uint8)
    q[0::2], q[1::2] = flat >> 4, flat & 0x0F
    values = _CODES[quant_type][q[:n]]
    am = np.asarray(absmax, dtype=np.float32)
    out = values * am[np.arange(n) // blocksize]
    return {"weight": out.astype(np.float32).reshape(tuple(shape))}


# --- AdaLoRA's budget ------------------------------------------------------------------------------


def adalora_budget(*, step, init_budget, target_budget, tinit, tfinal, total_step):
    """PEFT's cubic schedule (RankAllocator.budget_schedule): init before tinit, target after
    total_step − tfinal, else int(target + (init − target)·(1 − (step − tinit)/(T − tfinal − tinit))³)
    with Python's float arithmetic and int() truncation toward zero."""
    if step <= tinit:
        budget = init_budget
    elif step > total_step - tfinal:
        budget = target_budget
    else:
        mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((init_budget - target_budget) * (mul ** 3) + target_budget)
    return {"budget": np.array(int(budget))}
