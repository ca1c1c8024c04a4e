"""The key/value cache of incremental decoding, preallocated once per generation.

Shape legend: L layers, B batch, Hkv key/value heads, M = max_len (prompt + new tokens), hd head
width, T the tokens of one forward (the prompt, then 1 per step), P = length (positions held).

Each layer owns two buffers k, v (B, Hkv, M, hd), allocated once: a forward with T new tokens
writes its keys and values into positions P..P+T-1 and attends over the views [:, :, :P+T]. Nothing
is re-concatenated per token (a concatenating cache copies O(P) per step, O(M²) per generation).

The model calls ``update(layer, k, v)`` in every layer, then ``advance(T)`` once, after the last
layer: every layer of one forward writes at the same offset P. The attention op sees the last T
queries against P+T keys (Tq <= Tk), which under the causal mask is exactly the full forward's
rows P..P+T-1 (ops/attention.py).
"""
from __future__ import annotations

from ..backend import Backend, get_xp
from ..validation import check_int


class KVCache:
    """Preallocated keys and values for ``n_layers`` layers: k, v (B, Hkv, max_len, hd) each."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int, backend: Backend):
        for name, value in (("n_layers", n_layers), ("batch", batch), ("max_len", max_len),
                            ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            check_int("KVCache", name, value, min=1)
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [backend.zeros(shape) for _ in range(n_layers)]
        self.values = [backend.zeros(shape) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # P: positions written by the forwards so far

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated buffers (2 · L · B · Hkv · M · hd · itemsize)."""
        return sum(int(a.nbytes) for a in self.keys + self.values)

    def update(self, layer: int, k, v):
        """Write k, v (B, Hkv, T, hd) at positions P..P+T-1 of ``layer``; return the views of every
        position so far, (B, Hkv, P+T, hd) each."""
        P, T = self.length, k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if k.shape != v.shape or k.shape[:2] != buf_k.shape[:2] or k.shape[3] != buf_k.shape[3]:
            raise ValueError(f"KVCache.update: k, v must be (B, Hkv, T, hd) with (B, Hkv, hd) = "
                             f"{(buf_k.shape[0], buf_k.shape[1], buf_k.shape[3])}, got {tuple(k.shape)}, {tuple(v.shape)}")
        if P + T > self.max_len:
            raise ValueError(f"KVCache.update: {P} cached + {T} new positions exceed max_len = {self.max_len}")
        buf_k[:, :, P:P + T] = k
        buf_v[:, :, P:P + T] = v
        return buf_k[:, :, :P + T], buf_v[:, :, :P + T]

    def advance(self, T: int) -> None:
        """After a forward's last layer: the T positions it wrote are now held."""
        if self.length + T > self.max_len:
            raise ValueError(f"KVCache.advance: {self.length} + {T} positions exceed max_len = {self.max_len}")
        self.length += T


# --- prefix and prompt tuning's virtual tokens (adapters/prefix.py) -----------------------------
# A prefix is the past keys and values of Pk positions in every layer, as PEFT passes it
# (past_key_values): the tokens' keys follow it, k = [k_p | k], so the T queries are the last T of
# Pk + T keys under the causal mask, exactly as with a KV cache; unlike a cache it is trained, so
# the backward splits dk, dv. It is shared by the batch's rows: (Hkv, Pk, hd), broadcast over B,
# and its gradient is the sum over B. A prompt is Pp input embeddings (Pp, C) put before the
# tokens' own, shared by the rows likewise.

def prepend_prefix(prefix, k, v):
    """k, v (B, Hkv, T, hd), prefix (k_p, v_p) each (Hkv, Pk, hd) -> [k_p | k], [v_p | v] (B, Hkv, Pk+T, hd)."""
    k_p, v_p = prefix
    if k_p.shape != v_p.shape or k_p.ndim != 3 or k_p.shape[0] != k.shape[1] or k_p.shape[2] != k.shape[3]:
        raise ValueError(f"prefix: k_p, v_p must be (Hkv, Pk, hd) with (Hkv, hd) = {(k.shape[1], k.shape[3])}, "
                         f"got {tuple(k_p.shape)}, {tuple(v_p.shape)}")
    xp = get_xp(k)
    B = k.shape[0]
    k = xp.concatenate([xp.broadcast_to(k_p[None], (B, *k_p.shape)).astype(k.dtype, copy=False), k], axis=2)
    v = xp.concatenate([xp.broadcast_to(v_p[None], (B, *v_p.shape)).astype(v.dtype, copy=False), v], axis=2)
    return k, v


def split_prefix_grad(prefix, dk, dv):
    """k = [k_p | k] (k_p broadcast over B)  =>  ((dk_p, dv_p) (Hkv, Pk, hd) summed over B, dk, dv (B, Hkv, T, hd))."""
    Pk = prefix[0].shape[1]
    return (dk[:, :, :Pk].sum(axis=0), dv[:, :, :Pk].sum(axis=0)), dk[:, :, Pk:], dv[:, :, Pk:]


def prepend_prompt(prompt, x):
    """x (B, T, C), prompt (Pp, C) -> [prompt | x] (B, Pp + T, C); its backward is dprompt = Σ_B dx[:, :Pp]."""
    xp = get_xp(x)
    if prompt.ndim != 2 or prompt.shape[1] != x.shape[2]:
        raise ValueError(f"prompt: must be (Pp, C) with C = {x.shape[2]}, got {tuple(prompt.shape)}")
    return xp.concatenate([xp.broadcast_to(prompt[None].astype(x.dtype, copy=False), (x.shape[0], *prompt.shape)), x],
                          axis=1)


def virtual_lengths(kv_cache, prefix, prompt) -> tuple[int, int, int]:
    """(P cached positions, Pk prefix positions, Pp prompt positions) of one forward."""
    if kv_cache is not None and (prefix is not None or (prompt is not None and kv_cache.length)):
        raise ValueError("prefix / prompt: a forward with a kv_cache takes no prefix (prefix tuning writes it "
                         "into the cache's first positions) and a prompt only in its first forward, on an empty "
                         "cache (adapters/prefix.py)")
    P = 0 if kv_cache is None else kv_cache.length
    Pk = 0 if prefix is None else int(prefix[0][0].shape[1])
    Pp = 0 if prompt is None else int(prompt.shape[0])
    return P, Pk, Pp


def positions_taken(P: int, Pk: int, Pp: int) -> str:
    """How an input check names the positions not left to the tokens ("", " - 3 virtual tokens", ...)."""
    if P:
        return f" - {P} cached positions"
    return f" - {Pk + Pp} virtual tokens" if Pk + Pp else ""


def mask_covers(P: int, Pk: int, Pp: int) -> str:
    if P:
        return " (covering the cached positions too)"
    return " (covering the virtual tokens too)" if Pk + Pp else ""
