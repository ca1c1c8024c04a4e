"""GPT-2 as Modules: GPT2Model (the transformer) and GPT2LMHeadModel (tied LM head, causal loss).

Shape legend: B batch, T sequence, C = n_embd, H = n_head, hd = C/H, F = inner_dim (4C),
V = vocab_size, N = B·T.

    x   = drop(wte[ids] + wpe[0..T-1])                      (B, T, C), flattened to (N, C)
    for each block:
        h   = x + resid_drop(attn(ln_1(x)))                  attn: c_attn C->3C, causal SDPA, c_proj C->C
                                                             scores scale · q kᵀ, scale = 1/√hd, times
                                                             1/(i+1) in block i with scale_attn_by_inverse_layer_idx
        x   = h + resid_drop(c_proj(act(c_fc(ln_2(h)))))     mlp: c_fc C->F, c_proj F->C
    h_L = ln_f(x)                                            (N, C)
    logits = h_L wteᵀ                                         (N, V) -> (B, T, V)   lm_head tied to wte
    loss = mean_{t: label ≠ -100} CE(logits[:, t], labels[:, t+1])   (HF's shift)

Between the embeddings and the logits the activations are kept 2-D, (N, C): each projection is
then a single GEMM (a (B, T, C) @ (C, d) matmul runs as B batched GEMMs in NumPy, 4x slower);
only the attention reshapes to (B, H, T, hd), as views.

Attribute names are Hugging Face's, so a parameter's dotted name is its key in GPT2LMHeadModel's
state dict (``transformer.h.0.attn.c_attn.weight``); every projection is a Linear with weight
(d_out, d_in) (HF's Conv1D stores (d_in, d_out): model/hf.py transposes). Derivation: docs/models.md.

Dropout (training mode only): embd_pdrop on the embeddings, attn_pdrop on the attention
probabilities, resid_pdrop on each block's outputs; masks from one generator seeded by ``seed``.
"""
from __future__ import annotations

import math

from ..backend import Backend, ShapeBackend, get_xp, host_rng
from ..inputs import check_input_ids, check_int_range, check_mask, to_backend
from ..module import Linear, Module, ModuleList
from ..ops.attention import (
    attention_backward,
    attention_forward,
    merge_heads,
    s2_group_size,
    split_heads,
)
from .config import GPT2Config
from .kv_cache import (
    KVCache,
    mask_covers,
    positions_taken,
    prepend_prefix,
    prepend_prompt,
    split_prefix_grad,
    virtual_lengths,
)
from .layers import Activation, Dropout, Embedding, LayerNorm, PreNormBlock
from .lm_head import (
    NO_FORWARD,
    shifted_loss,
    tied_head_backward,
    tied_head_forward,
    upstream_dlogits,
)
from .output import ModelOutput


class Init:
    """Draws initial parameters on the host (so CPU and GPU start equal), then moves them once.
    On a :class:`~spectral_peft.backend.ShapeBackend` every parameter is the backend's memoryless
    zeros (a skeleton: shapes only, nothing drawn)."""

    def __init__(self, backend: Backend, seed: int, std: float):
        self.backend, self.rng, self.std = backend, host_rng(seed), std
        self.shapes_only = isinstance(backend, ShapeBackend)

    def normal(self, shape, std: float | None = None):
        if self.shapes_only:
            return self.backend.zeros(shape)
        return self.backend.asarray(self.rng.normal(0.0, self.std if std is None else std, size=shape))

    def zeros(self, shape):
        return self.backend.zeros(shape)

    def ones(self, shape):
        if self.shapes_only:
            return self.backend.zeros(shape)
        return self.backend.xp.ones(shape, dtype=self.backend.float)

    def linear(self, d_in: int, d_out: int, std: float | None = None) -> Linear:
        return Linear(self.normal((d_out, d_in), std), self.zeros((d_out,)))

    def layernorm(self, C: int, eps: float) -> LayerNorm:
        return LayerNorm(self.ones((C,)), self.zeros((C,)), eps)


class GPT2Attention(Module):
    """Causal multi-head self-attention.  x (N, C) -> y (N, C), N = B·T (tokens flattened, so
    every projection is one 2-D GEMM).

    c_attn: one Linear C -> 3C (q, k, v side by side, HF's layout); c_proj: C -> C.
    scale: the factor of q kᵀ (GPT2Config.attention_scale; None: 1/√hd). The attention op scales
    q by 1/√hd; any other factor is applied to q first, q' = q · scale·√hd, before the product.
    """

    def __init__(self, c_attn: Linear, c_proj: Linear, n_head: int, attn_pdrop: float, resid_pdrop: float, rng,
                 scale: float | None = None, layer_idx: int = 0):
        super().__init__()
        self.c_attn = c_attn
        self.c_proj = c_proj
        self.resid_dropout = Dropout(resid_pdrop, rng)
        self.n_head = n_head
        self.attn_pdrop = attn_pdrop  # dropout on the attention probabilities (HF's attn_dropout)
        self.rng = rng
        self.shift_group = None  # LongLoRA's S2-Attn: G (int) or G/T (float) when set (training only)
        self.scale = scale
        self.layer_idx = layer_idx  # this layer's slot in a KVCache
        self.prefix = None  # prefix tuning's (k_p, v_p), each (H, Pk, hd), set by the model per forward
        self.prefix_grad = None  # (dk_p, dv_p) (H, Pk, hd) after a backward with a prefix

    def _q_factor(self, hd: int):
        if self.scale is None or self.scale == hd ** -0.5:
            return None
        return self.scale * math.sqrt(hd)

    def forward(self, x, bt, key_padding_mask=None, kv_cache: KVCache | None = None):
        """x (N, C), bt = (B, T), key_padding_mask (B, P+T) bool or None -> (N, C). With a kv_cache
        the T new keys and values are written at positions P..P+T-1 and the T queries attend over
        all P+T (inference only: nothing is kept for a backward)."""
        B, T = bt
        C = x.shape[-1]
        H = self.n_head
        qkv = self.c_attn(x).reshape(B, T, 3 * C)  # (N, C) -> (N, 3C) -> (B, T, 3C), a view
        # views, no copies: (B, T, C) slices of qkv -> (B, H, T, hd)
        q = split_heads(qkv[..., :C], H)
        f = self._q_factor(C // H)
        if f is not None:
            q = q * f  # S = (q·f/√hd) kᵀ = scale · q kᵀ   (B, H, T, hd), a new array
        k = split_heads(qkv[..., C:2 * C], H)
        v = split_heads(qkv[..., 2 * C:], H)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H, P+T, hd) views of the cache
        if self.prefix is not None:
            k, v = prepend_prefix(self.prefix, k, v)  # (B, H, Pk+T, hd): the prefix as past keys/values
        p = self.attn_pdrop if self.training else 0.0
        out, attn_cache = attention_forward(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                                            shift_group=s2_group_size(self.shift_group, T) if self.training else None,
                                            dropout_p=p, rng=self.rng)
        self.cache = None if kv_cache is not None else (attn_cache, (B, T))
        y = self.c_proj(merge_heads(out).reshape(B * T, C))  # (B, H, T, hd) -> (N, C) -> (N, C)
        return self.resid_dropout(y)

    def backward(self, dy):
        if self.cache is None:
            raise RuntimeError("GPT2Attention.backward: no forward to differentiate (a forward with a "
                               "kv_cache is inference only)")
        dy = self.resid_dropout.backward(dy)
        # y = c_proj(merge_heads(out))  =>  dout = split_heads(c_proj.backward(dy))
        dmerged = self.c_proj.backward(dy)  # (N, C)
        attn_cache, (B, T) = self.cache
        H, C = self.n_head, dmerged.shape[-1]
        hd = C // H
        dq, dk, dv = attention_backward(split_heads(dmerged.reshape(B, T, C), H), attn_cache)  # (B, H, T, hd)
        self.cache = None
        if self.prefix is not None:  # k = [k_p | k]  =>  dk_p = Σ_B dk[:, :, :Pk], dk = dk[:, :, Pk:]
            self.prefix_grad, dk, dv = split_prefix_grad(self.prefix, dk, dv)
        f = self._q_factor(hd)
        if f is not None:
            dq *= f  # q' = q · f  =>  dq = dq' · f
        # q, k, v = split(qkv)  =>  dqkv = [merge(dq) | merge(dk) | merge(dv)], written in place
        dqkv = get_xp(dq).empty((B, T, 3, H, hd), dtype=dq.dtype)
        dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)  # (B, H, T, hd) -> (B, T, H, hd)
        dqkv[:, :, 1] = dk.transpose(0, 2, 1, 3)
        dqkv[:, :, 2] = dv.transpose(0, 2, 1, 3)
        return self.c_attn.backward(dqkv.reshape(B * T, 3 * C))  # (N, 3C) -> (N, C)


class GPT2MLP(Module):
    """x (N, C) -> c_fc (N, F) -> act -> c_proj (N, C) -> dropout."""

    def __init__(self, c_fc: Linear, c_proj: Linear, activation: str, resid_pdrop: float, rng):
        super().__init__()
        self.c_fc = c_fc
        self.act = Activation(activation)
        self.c_proj = c_proj
        self.dropout = Dropout(resid_pdrop, rng)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))

    def backward(self, dy):
        dy = self.dropout.backward(dy)
        return self.c_fc.backward(self.act.backward(self.c_proj.backward(dy)))


class GPT2Block(PreNormBlock):
    """Pre-LayerNorm block: h = x + attn(ln_1(x)); out = h + mlp(ln_2(h)).  (N, C) -> (N, C).
    forward(x, bt, key_padding_mask=None, kv_cache=None); the pass itself is PreNormBlock's."""

    PARTS = ("ln_1", "attn", "ln_2", "mlp")

    def __init__(self, ln_1, attn, ln_2, mlp):
        super().__init__()
        self.ln_1 = ln_1
        self.attn = attn
        self.ln_2 = ln_2
        self.mlp = mlp


class GPT2Model(Module):
    """The transformer: embeddings, n_layer blocks, final LayerNorm.  ids (B, T) -> h (N, C)."""

    def __init__(self, config: GPT2Config, backend: Backend, seed: int = 0):
        super().__init__()
        c = config
        init = Init(backend, seed, c.initializer_range)
        # Dropout masks come from one generator of the backend, seeded from the model's seed.
        self.rng = backend.rng(seed + 1)
        C, F = c.n_embd, c.inner_dim
        proj_std = c.initializer_range / math.sqrt(2 * c.n_layer)  # HF's scaled init of c_proj
        self.wte = Embedding(init.normal((c.vocab_size, C)))
        self.wpe = Embedding(init.normal((c.n_positions, C)))
        self.drop = Dropout(c.embd_pdrop, self.rng)
        self.h = ModuleList([
            GPT2Block(
                init.layernorm(C, c.layer_norm_epsilon),
                GPT2Attention(init.linear(C, 3 * C), init.linear(C, C, proj_std), c.n_head, c.attn_pdrop,
                              c.resid_pdrop, self.rng, scale=c.attention_scale(i), layer_idx=i),
                init.layernorm(C, c.layer_norm_epsilon),
                GPT2MLP(init.linear(C, F), init.linear(F, C, proj_std), c.activation_function, c.resid_pdrop, self.rng),
            )
            for i in range(c.n_layer)
        ])
        self.ln_f = init.layernorm(C, c.layer_norm_epsilon)
        self.config = config

    def forward(self, input_ids, key_padding_mask=None, position_ids=None, kv_cache=None, prefix=None,
                prompt=None):
        """input_ids (B, T) int, key_padding_mask (B, P+T) bool or None, position_ids (B, T) int or
        None (validated by the caller) -> h (N, C), N = B·T: activations stay 2-D so that every
        projection is one GEMM. Without position_ids the positions are P..P+T-1 for every row, as
        in HF (P: the positions a kv_cache already holds, or the Pk of a prefix).

        prefix: prefix tuning's per-layer (k_p, v_p), each (H, Pk, hd), the past keys and values of
        every layer (adapters/prefix.py); prompt: prompt tuning's (Pp, C) embeddings, put before the
        tokens' own, x = [prompt | wte[ids]], so T counts Pp + the tokens (position_ids, the mask and
        the output cover them)."""
        B, T = input_ids.shape
        Pp = 0 if prompt is None else prompt.shape[0]
        self.cache = ((B, T), position_ids is not None, Pp)
        xp = get_xp(self.wte.params["weight"])
        x = self.wte(input_ids)  # (B, T) -> (B, T, C)
        if prompt is not None:
            x = prepend_prompt(prompt, x)  # (B, Pp + T, C)
            T += Pp
        for i, block in enumerate(self.h):
            block.attn.prefix = None if prefix is None else prefix[i]
        if position_ids is None:
            P = (0 if kv_cache is None else kv_cache.length) + (0 if prefix is None else prefix[0][0].shape[1])
            x += self.wpe(xp.arange(P, P + T))  # + (T, C), broadcast over B
        else:
            x += self.wpe(position_ids)  # + (B, T, C): per-row positions (left-padded generation)
        x = self.drop(x.reshape(B * T, -1))  # (N, C)
        for block in self.h:
            x = block(x, (B, T), key_padding_mask, kv_cache)
        return self.ln_f(x)

    def backward(self, dh):
        """dh (N, C) -> None (gradients accumulate into the parameters)."""
        (ids_shape, per_row, Pp), self.cache = self.cache, None  # (B, T), whether position_ids were given
        dx = self.ln_f.backward(dh)
        for block in reversed(self.h.items):
            dx = block.backward(dx)
        dx = self.drop.backward(dx).reshape(ids_shape[0], -1, dx.shape[-1])  # (N, C) -> (B, Pp + T, C)
        # x = [prompt | wte[ids]] + wpe[pos]  =>  dprompt = Σ_B dx[:, :Pp], dwte = scatter(dx[:, Pp:]) over
        # ids, dwpe = scatter(dx) over pos
        self.prompt_grad = dx[:, :Pp].sum(axis=0) if Pp else None
        self.wte.backward(dx[:, Pp:])
        # pos = arange(T) shared by every row: the scatter is Σ_B dx, (B, T, C) -> (T, C)
        self.wpe.backward(dx if per_row else dx.sum(axis=0))
        return None


class GPT2LMHeadModel(Module):
    """GPT-2 with the language-model head tied to wte (no separate parameter).

    forward(input_ids (B, T), attention_mask (B, P+T) or None, labels (B, T) or None,
    position_ids (B, T) or None, kv_cache or None) -> ModelOutput with logits (B, T, V) and loss
    (float) when labels were given; backward(dlogits=None) after a forward without a cache.
    """

    TIED_EMBEDDING = "transformer.wte.weight"  # the parameter the tied head shares

    def __init__(self, config: GPT2Config, backend: Backend, seed: int = 0):
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise TypeError(f"GPT2LMHeadModel needs a GPT2Config, got {type(config).__name__}")
        self.transformer = GPT2Model(config, backend, seed)
        self.config = config
        self.backend = backend

    @property
    def max_positions(self) -> int:
        """The longest P + T a forward takes (n_positions)."""
        return self.config.n_positions

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache for ``batch`` sequences of up to ``max_len`` positions (prompt + new tokens)."""
        c = self.config
        if max_len > c.n_positions:
            raise ValueError(f"a KV cache of {max_len} positions exceeds n_positions = {c.n_positions}")
        return KVCache(c.n_layer, batch, max_len, c.n_head, c.n_embd // c.n_head, self.backend)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                kv_cache=None, prefix=None, prompt=None) -> ModelOutput:
        """prefix / prompt: prefix and prompt tuning's virtual tokens (GPT2Model.forward; given by
        adapters/prefix.py): with a prompt of Pp rows, T below is Pp + the tokens (labels,
        position_ids and the logits cover the virtual positions); the attention_mask covers the Pk
        prefix positions too."""
        c = self.config
        input_ids = to_backend(input_ids, self.backend)
        P, Pk, Pp = virtual_lengths(kv_cache, prefix, prompt)
        check_input_ids(input_ids, c.vocab_size, c.n_positions - P - Pk - Pp,
                        "n_positions" + positions_taken(P, Pk, Pp))
        B, T = input_ids.shape
        T += Pp
        if token_type_ids is not None:
            raise ValueError("token_type_ids: GPT-2 models take none (pass token_type_ids=None)")
        if kv_cache is not None and labels is not None:
            raise ValueError("labels: a forward with a kv_cache is inference only; pass labels=None")
        mask = check_mask(None if attention_mask is None else to_backend(attention_mask, self.backend),
                          (B, P + Pk + T), "attention_mask" + mask_covers(P, Pk, Pp))
        if position_ids is not None:
            position_ids = to_backend(position_ids, self.backend)
            check_int_range(position_ids, (B, T), 0, c.n_positions, "position_ids")
        if labels is not None:
            labels = to_backend(labels, self.backend)
            check_int_range(labels, (B, T), 0, c.vocab_size, "labels", ignore=-100)
        self.cache = None
        h = self.transformer(input_ids, mask, position_ids, kv_cache, prefix, prompt)  # (N, C)
        if kv_cache is not None:
            kv_cache.advance(T)
        # logits = h wteᵀ (the tied lm_head), (N, C) -> (N, V)
        logits, lin_cache = tied_head_forward(h, self.transformer.wte, keep=kv_cache is None)
        loss, ce_cache = shifted_loss(logits, labels, B) if labels is not None else (None, None)
        # the head's cache: (x of logits = h wteᵀ, cross-entropy cache or None, (B, T))
        self.cache = None if kv_cache is not None else (lin_cache, ce_cache, (B, T))
        return ModelOutput(logits=logits.reshape(B, T, -1), loss=loss)  # (N, V) -> (B, T, V), a view

    def backward(self, dlogits=None) -> None:
        """Accumulate every parameter gradient: of the loss (dloss = 1) when labels were given and
        ``dlogits`` is None, else of Σ logits ⊙ dlogits (dlogits (B, T, V))."""
        if self.cache is None:
            raise RuntimeError(NO_FORWARD)
        lin_cache, ce_cache, (B, T) = self.cache
        dlogits = upstream_dlogits(dlogits, ce_cache, (B, T, self.config.vocab_size), self.backend)  # (N, V)
        self.cache = None
        # logits = h wteᵀ  =>  dh = dlogits wte,  dwte += dlogitsᵀ h
        self.transformer.backward(tied_head_backward(dlogits, lin_cache, self.transformer.wte))
