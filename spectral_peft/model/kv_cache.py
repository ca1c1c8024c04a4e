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

from ..backend import Backend
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
