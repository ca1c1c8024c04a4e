"""Multi-head scaled-dot-product attention on already-split heads, and the head split/merge.

Shape legend: B batch, H heads, T sequence, hd = C/H head width, C model width; with grouped
queries Hkv key/value heads, G = H/Hkv, and Tq <= Tk query and key lengths (Tq = Tk = T otherwise).
q, out, dq (B, H, Tq, hd); k, v, dk, dv (B, Hkv, Tk, hd); S, P (B, H, Tq, Tk);
key_padding_mask (B, Tk).

Forward:
    S = q kᵀ / √hd                                   (B, H, T, T)
    S[i, j] = -∞ where j is masked for query i:      causal (j > i), or key j is padding
                                                     (added in place as a -∞/0 bias)
    P = softmax_j(S)                                 (B, H, T, T)
    out = P v                                        (B, H, T, hd)
Backward (D_i = Σ_j P_ij dP_ij = dout_i · out_i, the FlashAttention identity):
    dv = Pᵀ dout,  dP = dout vᵀ,  dS = P ⊙ (dP - D),  dq = dS k / √hd,  dk = dSᵀ q / √hd

Grouped-query attention (Llama 2/3, Mistral, Qwen2): k and v carry Hkv heads, H = G·Hkv, and
query head h reads key/value head h // G (Hugging Face's repeat_kv order). The G query heads of a
group are stacked along the query axis, q (B, H, Tq, hd) -> (B, Hkv, G·Tq, hd), so every product
is against the un-repeated k, v; the backward's dk = dSᵀ q and dv = Pᵀ dout then sum over the
group by themselves: no repeated K/V is ever formed, forward or backward.

Decoding with a KV cache: Tq <= Tk queries are the last Tq positions of the Tk keys, so under the
causal mask query i (absolute position Tk - Tq + i) sees keys j <= Tk - Tq + i. Sliding window W
(Mistral): it also sees only keys j > Tk - Tq + i - W (masking_utils' sliding_window_overlay).

Fully masked rows (a query that may attend to no key, e.g. an all-padding sequence, or left
padding under a causal mask): this engine gives P = 0 on that row, hence out = 0 and zero
gradients, never NaN. Hugging Face masks with the dtype's most negative value instead of -∞, which
on such a row gives a uniform average of v: the two agree on every row that has at least one
visible key, which is every row whose output is meaningful (right padding, as GPT-2 and BERT use).

The cache holds q, k, v (needed for dk, dq, dv), P (the one (B, H, T, T) float array kept) and out
(to form D without a second (B, H, T, T) temporary); callers must not write into ``out`` in place
before the backward. The backward allocates a single (B, H, T, T) temporary (dP, turned into dS in
place). A causal training forward of T > QUERY_BLOCK tokens is taken by query blocks (below): each
block caches its own q, k, v views and P of (block, keys up to the block's end). With attention dropout (dropout_p > 0, HF's attn_dropout: out = P̃ v, P̃ = P ⊙ M/(1 - p)),
the bool mask M is cached too and P̃ is rebuilt for dv (one more temporary, freed at once).
"""
from __future__ import annotations

import math

from ..backend import get_xp


def split_heads(x, H: int):
    """(B, T, C) -> (B, H, T, hd), hd = C/H: a view, no copy."""
    if x.ndim != 3:
        raise ValueError(f"split_heads: x must have shape (B, T, C), got {tuple(x.shape)}")
    B, T, C = x.shape
    if H < 1 or C % H:
        raise ValueError(f"split_heads: H = {H} must be a positive divisor of C = {C}")
    return x.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)  # (B, T, H, hd) -> (B, H, T, hd)


def merge_heads(x):
    """(B, H, T, hd) -> (B, T, C), C = H·hd: a contiguous copy. It is also split_heads' backward."""
    if x.ndim != 4:
        raise ValueError(f"merge_heads: x must have shape (B, H, T, hd), got {tuple(x.shape)}")
    B, H, T, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * hd)  # (B, T, H, hd) -> (B, T, C)


def split_heads_backward(dout):
    """y = split_heads(x)  =>  dx = merge_heads(dy): (B, H, T, hd) -> (B, T, C)."""
    return merge_heads(dout)


def merge_heads_backward(dout, H: int):
    """y = merge_heads(x)  =>  dx = split_heads(dy, H): (B, T, C) -> (B, H, T, hd)."""
    return split_heads(dout, H)


def _check_qkv(q, k, v, key_padding_mask):
    if q.ndim != 4:
        raise ValueError(f"attention_forward: q must have shape (B, H, Tq, hd), got {tuple(q.shape)}")
    if q.dtype.kind != "f":
        raise ValueError(f"attention_forward: q must be float32 or float64, got {q.dtype}")
    B, H, _, hd = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != B or k.shape[3] != hd:
        name, a = ("k", k) if k.shape != q.shape else ("v", v)
        raise ValueError(f"attention_forward: {name} must have q's shape (B, H, T, hd) = {tuple(q.shape)}, or with "
                         f"grouped queries or a KV cache (B, Hkv, Tk, hd) equal for k and v; got {tuple(a.shape)}")
    for name, a in (("k", k), ("v", v)):
        if a.dtype != q.dtype:
            raise ValueError(f"attention_forward: {name} must have q's dtype {q.dtype}, got {a.dtype}")
    if H % k.shape[1]:
        raise ValueError(f"attention_forward: q's head count H = {H} must be a multiple of k's Hkv = {k.shape[1]}")
    if key_padding_mask is not None:
        Tk = k.shape[2]
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(f"attention_forward: key_padding_mask must have shape (B, T) = ({B}, {Tk}) (T the key length), got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype.kind not in "biu":
            raise ValueError(f"attention_forward: key_padding_mask must be bool or int (1 = real token, 0 = padding), got {key_padding_mask.dtype}")


def attention_mask(Tq: int, Tk: int, causal: bool, key_padding_mask=None, sliding_window: int | None = None, xp=None):
    """The removed scores, bool broadcastable to (B, 1, Tq, Tk), True where query i may not see key
    j, or None when nothing is removed. Query i sits at absolute position Tk - Tq + i."""
    masked = None
    if causal:
        masked = xp.triu(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)[None, None]  # j > Tk - Tq + i
        if sliding_window is not None:
            masked |= xp.tril(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq - sliding_window)  # j <= pos_i - W
    if key_padding_mask is not None:
        pad = (key_padding_mask == 0)[:, None, None, :]  # (B, 1, 1, Tk)
        masked = pad if masked is None else (masked | pad)
    return masked


def attention_forward(q, k, v, causal: bool, key_padding_mask=None, shift_group: int | None = None,
                      dropout_p: float = 0.0, rng=None, sliding_window: int | None = None):
    """out = softmax(q kᵀ/√hd + mask) v per head.

    q (B, H, Tq, hd), k, v (B, Hkv, Tk, hd) with Hkv dividing H (grouped-query attention when
    Hkv < H) and Tq <= Tk under the causal mask (the queries are the last Tq positions: cached
    decoding); causal: query i sees keys j <= Tk - Tq + i; sliding_window W (causal only): and
    j > Tk - Tq + i - W; key_padding_mask (B, Tk), 1 = real token, 0 = padding (never attended
    to), or None. -> out (B, H, Tq, hd), cache.
    shift_group = G: LongLoRA's S2-Attn instead of full attention (training only; Tq = Tk; see
    :func:`s2_attention_forward`).
    dropout_p > 0: inverted dropout on the attention probabilities P (HF's attn_dropout), the mask
    drawn from ``rng``; pass 0 (the default) at evaluation.
    """
    _check_qkv(q, k, v, key_padding_mask)
    _check_dropout(dropout_p, rng)
    Tq, Tk = q.shape[2], k.shape[2]
    if shift_group is not None:
        if Tq != Tk:
            raise ValueError("attention_forward: shift_group (S2-Attn) needs Tq = Tk (no KV cache: training only)")
        return s2_attention_forward(q, k, v, causal, shift_group, key_padding_mask, dropout_p, rng)
    if causal and Tq > Tk:
        raise ValueError(f"attention_forward: causal attention needs Tq <= Tk (queries are the last Tq keys), got Tq = {Tq}, Tk = {Tk}")
    if sliding_window is not None and (not causal or type(sliding_window) is not int or sliding_window < 1):
        raise ValueError(f"attention_forward: sliding_window must be a positive int with causal=True, got {sliding_window!r}")
    bounds = causal_query_blocks(Tq, Tk, causal, dropout_p)
    if bounds is not None:
        return _blocked_forward(q, k, v, bounds, key_padding_mask, sliding_window)
    return _dense_attention(q, k, v, causal, key_padding_mask, dropout_p, rng, sliding_window)


# --- causal attention by query blocks ----------------------------------------------------------
# Under the causal mask the queries of block [a, e) see only keys [0, e): the scores of the later keys
# are all removed. A training forward (Tq = Tk = T, no dropout) is therefore taken block by block, each
# block a cached-decoding attention of e - a queries against the first e keys, and the removed upper
# triangle beyond each block's last key is never computed: in blocks of 128 the six per-head products
# and the softmax's passes cover 3/4 of the T x T scores at T = 256, 0.56 at T = 1024 (T <= 128 is one
# block, the one-block path unchanged). The rows are the same functions of the same visible scores:
# equal to the one-block path within rounding (the row sums and P v skip the removed zeros, so their
# summation order differs; tests/test_ops_attention_blocks.py).
# Attention dropout keeps the one-block path, so a seed draws the same (B, H, T, T) mask as before.
QUERY_BLOCK = 128  # query rows per block (measured: 128 beats 64 and 256 at T 256-1024, docs/performance.md)


def causal_query_blocks(Tq: int, Tk: int, causal: bool, dropout_p: float = 0.0, block: int | None = None):
    """[(a, e), ...] query blocks of a causal training forward (queries a..e-1 see keys 0..e-1), or
    None where attention is taken in one block (not causal, cached decoding Tq != Tk, attention
    dropout, or T <= block); ``block`` rows per block, QUERY_BLOCK by default."""
    block = QUERY_BLOCK if block is None else block
    if not causal or Tq != Tk or dropout_p > 0 or Tq <= block:
        return None
    return [(a, min(a + block, Tq)) for a in range(0, Tq, block)]


def _blocked_forward(q, k, v, bounds, key_padding_mask, sliding_window):
    """out (B, H, T, hd) of causal attention, block by block: out[a:e] = attention(q[a:e], k[:e], v[:e]).
    Cache ("blocks", [(a, e, block cache), ...])."""
    xp = get_xp(q)
    out = xp.empty(q.shape, dtype=q.dtype)
    caches = []
    for a, e in bounds:
        pad = None if key_padding_mask is None else key_padding_mask[:, :e]
        out_b, cache_b = _dense_attention(q[:, :, a:e], k[:, :, :e], v[:, :, :e], True, pad, 0.0, None, sliding_window)
        out[:, :, a:e] = out_b
        caches.append((a, e, cache_b))
    return out, ("blocks", caches)


def _blocked_backward(dout, caches):
    """(dq, dk, dv) of :func:`_blocked_forward`: each block's backward, dq written per block, dk and dv
    summed over the blocks that read each key (out[a:e] = f(q[a:e], k[:e], v[:e]) => dk[:e] += dk_block)."""
    xp = get_xp(dout)
    dq = xp.empty(dout.shape, dtype=dout.dtype)
    dk = dv = None
    for a, e, cache_b in reversed(caches):  # the last block reads every key: its dk, dv start the sums
        dq_b, dk_b, dv_b = attention_backward(dout[:, :, a:e], cache_b)
        dq[:, :, a:e] = dq_b
        if dk is None:
            dk, dv = dk_b, dv_b
        else:
            dk[:, :, :e] += dk_b
            dv[:, :, :e] += dv_b
    return dq, dk, dv


def _dense_attention(q, k, v, causal: bool, key_padding_mask, dropout_p: float, rng, sliding_window):
    """attention_forward's one-block path (arguments checked there): every query against every key,
    the removed scores masked. -> out (B, H, Tq, hd), cache ("full", core)."""
    B, H, Tq, hd = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    xp = get_xp(q)
    G = H // Hkv
    masked = attention_mask(Tq, Tk, causal, key_padding_mask, sliding_window, xp)
    if G > 1:
        # the G query heads of each group stacked along the query axis: (B, H, Tq, hd) -> (B, Hkv, G·Tq, hd)
        q = q.reshape(B, Hkv, G * Tq, hd)
        if masked is not None:  # (b, 1, Tq, Tk) -> (b, 1, G·Tq, Tk), the same rows for every head of a group
            masked = xp.broadcast_to(masked[:, :, None], (masked.shape[0], 1, G, Tq, Tk)).reshape(-1, 1, G * Tq, Tk)
    out, core = _sdpa_forward(q, k, v, masked, key_padding_mask is not None, dropout_p, rng)
    return out.reshape(B, H, Tq, hd), ("full", core)


def attention_backward(dout, cache):
    """(dq (B, H, Tq, hd), dk, dv (B, Hkv, Tk, hd)) of out = softmax(q kᵀ/√hd + mask) v."""
    kind, core = cache
    if kind == "s2":
        return s2_attention_backward(dout, cache)
    if kind == "blocks":
        return _blocked_backward(dout, core)
    B, H, Tq, hd = dout.shape
    Hkv = core[1].shape[1]
    if H % Hkv or core[0].shape[2] * Hkv != H * Tq:
        raise ValueError(f"attention_backward: dout (B, H, Tq, hd) = {tuple(dout.shape)} does not match the forward's "
                         f"stacked queries {tuple(core[0].shape)}")
    # out = reshape(out_g)  =>  dout_g = reshape(dout); q_g = reshape(q)  =>  dq = reshape(dq_g);
    # dk, dv come back (B, Hkv, Tk, hd), already summed over each group's G query heads
    dq, dk, dv = _sdpa_backward(dout.reshape(core[0].shape), core)
    return dq.reshape(B, H, Tq, hd), dk, dv


def _check_dropout(dropout_p, rng) -> None:
    try:
        ok = 0.0 <= float(dropout_p) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"attention_forward: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and rng is None:
        raise ValueError(f"attention_forward: dropout_p = {dropout_p} needs rng, a generator of the arrays' namespace")


def _sdpa_forward(q, k, v, masked, may_be_fully_masked: bool, dropout_p: float = 0.0, rng=None):
    """The attention itself, over any leading dims L (L = (B, H) here, (B, H, T/G) in S2-Attn).

    q, k, v (*L, T, hd); masked: bool broadcastable to (*L, T, T), True where a score is removed,
    or None; may_be_fully_masked: whether a row can have no visible key (padding);
    dropout_p, rng: dropout on P. -> out (*L, T, hd), cache (q, k, v, P, keep, out, scale).
    """
    xp = get_xp(q)
    Tk, hd = k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(hd)
    # S = (q / √hd) kᵀ: the scale goes on q, (B, H, T, hd), not on S, (B, H, T, T): a smaller pass
    P = (q * scale) @ k.swapaxes(-1, -2)  # (B, H, T, hd) @ (B, H, hd, T) -> (B, H, T, T)
    if masked is not None:
        # S + bias, bias = -∞ where a score is removed and 0 elsewhere, shaped like ``masked``
        # (at most (B, 1, T, T), H times smaller than S): one add in place, 0.05 ms at (8, 4, 128,
        # 128) float32 against 0.14 ms for copyto(S, -∞, where=masked) (docs/performance.md); the
        # same S for finite scores (S + 0 = S, S + -∞ = -∞), which q kᵀ of finite q, k always is
        P += xp.where(masked, -math.inf, 0.0).astype(P.dtype, copy=False)
    # P = softmax_j(S), max-subtracted; a fully masked row has max -∞: use 0 there, so that
    # every exponent is e^(-∞) = 0 and the row sums to 0; dividing by 1 then leaves P = 0.
    m = P.max(axis=-1, keepdims=True)  # (B, H, T, 1)
    if may_be_fully_masked:
        m[m == -math.inf] = 0.0
    P -= m
    xp.exp(P, out=P)
    denom = (P @ xp.ones(Tk, dtype=P.dtype))[..., None]  # (B, H, T, 1)  row sums as BLAS gemv
    if may_be_fully_masked:
        denom[denom == 0] = 1.0
    P /= denom
    keep = None
    if dropout_p > 0:
        # P̃ = P ⊙ M / (1 - p), M ~ Bernoulli(1 - p); only the bool mask is kept, P̃ is rebuilt
        keep = rng.random(P.shape, dtype=P.dtype) >= dropout_p  # (B, H, T, T) bool
        out = _dropped(P, keep, dropout_p) @ v  # (B, H, T, T) @ (B, H, T, hd) -> (B, H, T, hd)
    else:
        out = P @ v  # (B, H, T, T) @ (B, H, T, hd) -> (B, H, T, hd)
    return out, (q, k, v, P, (keep, dropout_p), out, scale)


def _dropped(P, keep, p: float):
    """P̃ = P ⊙ M / (1 - p), a new (B, H, T, T) array."""
    Pd = P * (1.0 / (1.0 - p))
    Pd *= keep
    return Pd


def _sdpa_backward(dout, core):
    """(dq, dk, dv), each (*L, T, hd), from the cache of :func:`_sdpa_forward`."""
    q, k, v, P, (keep, p), out, scale = core
    xp = get_xp(dout)
    if dout.shape != out.shape:
        raise ValueError(f"attention_backward: dout must have shape (B, H, T, hd) = {tuple(out.shape)}, got {tuple(dout.shape)}")
    # out = P v  =>  dv = Pᵀ dout      (with dropout: out = P̃ v  =>  dv = P̃ᵀ dout)
    dv = (P if keep is None else _dropped(P, keep, p)).swapaxes(-1, -2) @ dout  # (B, H, T, hd)
    # out = P v  =>  dP = dout vᵀ
    dS = dout @ v.swapaxes(-1, -2)  # (B, H, T, hd) @ (B, H, hd, T) -> (B, H, T, T)
    if keep is not None:
        # P̃ = P ⊙ M / (1 - p)  =>  dP = dP̃ ⊙ M / (1 - p)
        dS *= 1.0 / (1.0 - p)
        dS *= keep
    # P = softmax(S)  =>  dS = P ⊙ (dP - D),  D_i = Σ_j P_ij dP_ij = dout_i · out_i
    # (with dropout too: Σ_j P_ij dP_ij = Σ_j P̃_ij dP̃_ij = dout_i · out_i)
    D = xp.einsum("...i,...i->...", dout, out)[..., None]  # (B, H, T, 1), no (B, H, T, hd) temporary
    dS -= D
    dS *= P  # masked entries have P = 0, so their score gradient is 0
    # S = q kᵀ / √hd  =>  dq = dS k / √hd,  dk = dSᵀ q / √hd   (scaled on the (B, H, T, hd) side)
    dq = dS @ k  # (B, H, T, T) @ (B, H, T, hd) -> (B, H, T, hd)
    dq *= scale
    dk = dS.swapaxes(-1, -2) @ q
    dk *= scale
    return dq, dk, dv


# --- LongLoRA's shifted sparse attention (S2-Attn) ---------------------------------------------
# Source: dvlab-research/LongLoRA llama_attn_replace.py; Chen et al. 2024 (facts restated, no code).
# The sequence is cut into T/G groups of G tokens and each query attends only within its group
# (causally, when causal). The upper half of the heads, h >= H // 2, first rolls q, k, v by -G/2
# along the sequence, so their groups straddle the lower half's group boundaries and information
# crosses groups; their output is rolled back by +G/2. Cost per head: T·G instead of T².
# As in LongLoRA, the shifted heads' last group wraps around: it holds tokens T - G/2 .. T - 1
# followed by 0 .. G/2 - 1 (so under causal masking those first tokens see the last ones).
# Padding: here a padded key is removed in every group it lands in (the rolled mask for the
# shifted heads); LongLoRA's own eager path reuses the first group's causal mask instead.

def _s2_group(a, G: int):
    """(B, H, T, ...) -> (B, H, T/G, G, ...), the upper half of the heads rolled by -G/2 first."""
    B, H, T = a.shape[:3]
    xp = get_xp(a)
    h0 = H // 2
    rolled = xp.concatenate([a[:, :h0], xp.roll(a[:, h0:], -(G // 2), axis=2)], axis=1)
    return rolled.reshape(B, H, T // G, G, *a.shape[3:])


def _s2_ungroup(a):
    """(B, H, T/G, G, hd) -> (B, H, T, hd), the upper half of the heads rolled back by +G/2."""
    B, H, nG, G = a.shape[:4]
    xp = get_xp(a)
    h0 = H // 2
    a = a.reshape(B, H, nG * G, *a.shape[4:])
    return xp.concatenate([a[:, :h0], xp.roll(a[:, h0:], G // 2, axis=2)], axis=1)


def s2_group_size(shift_group, T: int):
    """The S2-Attn group size G of a forward of T tokens: ``shift_group`` itself when an int,
    G = ratio·T when a float ratio in (0, 1] (LongLoRA's group_size_ratio, 1/4 in the paper), None
    when None (full attention). A ratio whose G is not a whole number is refused here, before any
    work; :func:`s2_attention_forward` refuses a G that is odd or does not divide T."""
    if shift_group is None or isinstance(shift_group, int):
        return shift_group
    G = float(shift_group) * T
    if not 0 < float(shift_group) <= 1 or G != int(G):
        raise ValueError(f"shift_group ratio {shift_group!r} of T = {T} gives G = {G:g}, not a whole number of "
                         "tokens; choose T divisible by the ratio's denominator (LongLoRA: T divisible by 4)")
    return int(G)


def s2_attention_forward(q, k, v, causal: bool, shift_group: int, key_padding_mask=None,
                         dropout_p: float = 0.0, rng=None):
    """LongLoRA S2-Attn: attention within groups of G = shift_group tokens, half the heads shifted.

    q (B, H, T, hd), k, v (B, H, T, hd) or grouped (B, Hkv, T, hd), with T divisible by G, G even
    (LongLoRA uses G = T/4); key_padding_mask (B, T) or None; dropout_p, rng: dropout on P as in
    attention_forward. -> out (B, H, T, hd), cache.
    Grouped queries: k, v are repeated to H heads first (head h reads kv head h // (H/Hkv), HF's
    repeat_kv, as LongLoRA does), and the backward sums dk, dv back over each group.
    """
    _check_qkv(q, k, v, key_padding_mask)
    _check_dropout(dropout_p, rng)
    B, H, T, hd = q.shape
    G = shift_group
    if not isinstance(G, int) or G < 2 or G % 2 or T % G:
        raise ValueError(f"shift_group must be an even divisor of T = {T} (LongLoRA: T/4), got {G!r}")
    xp = get_xp(q)
    rep = H // k.shape[1]
    if rep > 1:  # (B, Hkv, T, hd) -> (B, H, T, hd): k_rep[:, h] = k[:, h // rep]
        k, v = xp.repeat(k, rep, axis=1), xp.repeat(v, rep, axis=1)
    qg, kg, vg = (_s2_group(a, G) for a in (q, k, v))  # (B, H, T/G, G, hd)
    masked = None  # broadcastable to (B, H, T/G, G, G)
    if causal:
        masked = xp.triu(xp.ones((G, G), dtype=bool), k=1)  # within each group: j > i
    if key_padding_mask is not None:
        pad = xp.broadcast_to((key_padding_mask == 0)[:, None, :, None], (B, H, T, 1))
        pad = _s2_group(pad, G).swapaxes(-1, -2)  # (B, H, T/G, 1, G): each group's padded keys
        masked = pad if masked is None else (masked | pad)
    out_g, core = _sdpa_forward(qg, kg, vg, masked, key_padding_mask is not None, dropout_p, rng)
    return _s2_ungroup(out_g), ("s2", (core, G, rep))


def s2_attention_backward(dout, cache):
    """(dq, dk, dv), each (B, H, T, hd), of S2-Attn: the grouped attention's backward, with the
    rolls undone (the adjoint of a roll by -G/2 is the roll by +G/2)."""
    _, (core, G, rep) = cache
    B, H, nG, _, hd = core[0].shape
    if dout.shape != (B, H, nG * G, hd):
        raise ValueError(f"attention_backward: dout must have shape (B, H, T, hd) = {(B, H, nG * G, hd)}, got {tuple(dout.shape)}")
    # out = ungroup(out_g)  =>  dout_g = group(dout)
    grads_g = _sdpa_backward(_s2_group(dout, G), core)
    # q_g = group(q)  =>  dq = ungroup(dq_g)   (and the same for k, v)
    dq, dk, dv = (_s2_ungroup(d) for d in grads_g)
    if rep > 1:  # k_rep[:, h] = k[:, h // rep]  =>  dk[:, j] = Σ_{h // rep = j} dk_rep[:, h]
        dk = dk.reshape(B, H // rep, rep, nG * G, hd).sum(axis=2)
        dv = dv.reshape(B, H // rep, rep, nG * G, hd).sum(axis=2)
    return dq, dk, dv
