"""The LLaMA family as Modules: Llama, Mistral and Qwen2 causal language models.

Shape legend: B batch, T tokens of this forward, P positions already in the KV cache (0 without
one), C hidden_size, H query heads, Hkv key/value heads (H = G·Hkv), hd head_dim, F
intermediate_size, V vocab_size, N = B·T, D <= hd the rotated width.

    x = embed_tokens[ids]                                          (N, C)
    cos, sin = rope(position_ids)                                  (B, T, D), once per forward
    for each decoder layer i:
        h = x + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))    n = input_layernorm(x)
            q (B, H, T, hd); k, v (B, Hkv, T, hd): grouped-query attention, causal, and
            sliding-window where the config sets it for layer i (config.layer_sliding_window(i))
        x = h + down_proj(silu(gate_proj(m)) ⊙ up_proj(m))                   m = post_attention_layernorm(h)
    logits = norm(x) lm_headᵀ     (N, V); lm_head is embed_tokens when tie_word_embeddings
    loss = mean_{t: label ≠ -100} CE(logits[:, t], labels[:, t+1])   (HF's shift)

The families differ only in their config (model/llama_config.py): which projections carry a bias
(Llama: attention_bias on q, k, v, o and mlp_bias on the MLP; Qwen2: q, k, v always; Mistral:
none) and which layers use a sliding window. Attribute names are Hugging Face's, so a parameter's
dotted name is its key in the checkpoint (``model.layers.0.self_attn.q_proj.weight``).

Position ids default to P..P+T-1 for every row, as transformers' forward without position_ids;
generation with left padding passes cumsum(mask) - 1 (generation.py). With a KV cache the
attention_mask covers all P+T positions and the forward is inference only (no backward).
Derivation of every backward: docs/llama.md.
"""
from __future__ import annotations

from ..backend import Backend, get_xp
from ..inputs import check_input_ids, check_int_range, check_mask, to_backend
from ..module import Linear, Module, ModuleList
from ..ops.activation import swiglu_backward, swiglu_forward
from ..ops.attention import (
    attention_backward,
    attention_forward,
    merge_heads,
    s2_group_size,
    split_heads,
)
from ..ops.rope import rope_backward, rope_cos_sin, rope_forward, rope_init
from .gpt2 import Init
from .kv_cache import (
    KVCache,
    mask_covers,
    positions_taken,
    prepend_prefix,
    prepend_prompt,
    split_prefix_grad,
    virtual_lengths,
)
from .layers import Embedding, PreNormBlock, RMSNorm
from .llama_config import LlamaConfig, MistralConfig, Qwen2Config
from .lm_head import (
    NO_FORWARD,
    shifted_loss,
    tied_head_backward,
    tied_head_forward,
    upstream_dlogits,
)
from .output import ModelOutput


class LlamaAttention(Module):
    """Grouped-query self-attention with rotary positions.  x (N, C) -> y (N, C).

    q_proj C -> H·hd, k_proj and v_proj C -> Hkv·hd, o_proj H·hd -> C. The Hkv key/value heads are
    shared by groups of G = H/Hkv query heads inside the attention op: K and V are never repeated.
    """

    def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, n_heads: int,
                 n_kv_heads: int, attention_dropout: float, sliding_window: int | None, layer_idx: int, rng):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.attention_dropout = attention_dropout
        self.sliding_window = sliding_window
        self.layer_idx = layer_idx
        self.rng = rng
        self.shift_group = None  # LongLoRA's S2-Attn: G (int) or G/T (float) when set (training only)
        self.prefix = None  # prefix tuning's (k_p, v_p), each (Hkv, Pk, hd), set by the model per forward
        self.prefix_grad = None  # (dk_p, dv_p) (Hkv, Pk, hd) after a backward with a prefix

    def forward(self, x, bt, cos, sin, key_padding_mask=None, kv_cache: KVCache | None = None):
        """x (N, C), bt = (B, T), cos/sin (B, T, D), key_padding_mask (B, P+T) bool or None -> (N, C)."""
        B, T = bt
        H, Hkv = self.n_heads, self.n_kv_heads
        q = split_heads(self.q_proj(x).reshape(B, T, -1), H)  # (N, H·hd) -> (B, H, T, hd)
        k = split_heads(self.k_proj(x).reshape(B, T, -1), Hkv)  # (B, Hkv, T, hd)
        v = split_heads(self.v_proj(x).reshape(B, T, -1), Hkv)
        q, _ = rope_forward(q, cos, sin)
        k, _ = rope_forward(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, P+T, hd) views of the cache
        if self.prefix is not None:
            # past keys, as PEFT passes them: the prefix is not rotated, the tokens' keys were
            k, v = prepend_prefix(self.prefix, k, v)  # (B, Hkv, Pk+T, hd)
        p = self.attention_dropout if self.training else 0.0
        out, attn_cache = attention_forward(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                                            shift_group=s2_group_size(self.shift_group, T) if self.training else None,
                                            dropout_p=p, rng=self.rng, sliding_window=self.sliding_window)
        # with a cache the forward is inference only: nothing is kept for a backward
        self.cache = None if kv_cache is not None else (attn_cache, (cos, sin), (B, T))
        return self.o_proj(merge_heads(out).reshape(B * T, -1))  # (B, H, T, hd) -> (N, H·hd) -> (N, C)

    def backward(self, dy):
        if self.cache is None:
            raise RuntimeError("LlamaAttention.backward: no forward to differentiate (a forward with a "
                               "kv_cache is inference only)")
        attn_cache, rope_cache, (B, T) = self.cache
        self.cache = None
        # y = o_proj(merge_heads(out))  =>  dout = split_heads(o_projᵀ dy)
        dout = split_heads(self.o_proj.backward(dy).reshape(B, T, -1), self.n_heads)
        dq, dk, dv = attention_backward(dout, attn_cache)  # (B, H, T, hd), (B, Hkv, T, hd) twice
        if self.prefix is not None:  # k = [k_p | rope(k0)]  =>  dk_p = Σ_B dk[:, :, :Pk], the rest is rope(k0)'s
            self.prefix_grad, dk, dv = split_prefix_grad(self.prefix, dk, dv)
        # q = rope(q0), k = rope(k0)  =>  dq0 = ropeᵀ dq, dk0 = ropeᵀ dk (the transposed rotation)
        dq = rope_backward(dq, rope_cache)
        dk = rope_backward(dk, rope_cache)
        # q0, k0, v = q_proj(x), k_proj(x), v_proj(x)  =>  dx = q_projᵀ dq0 + k_projᵀ dk0 + v_projᵀ dv
        dx = self.q_proj.backward(merge_heads(dq).reshape(B * T, -1))
        dx += self.k_proj.backward(merge_heads(dk).reshape(B * T, -1))
        dx += self.v_proj.backward(merge_heads(dv).reshape(B * T, -1))
        return dx


class LlamaMLP(Module):
    """SwiGLU feed-forward: y = down_proj(silu(gate_proj(x)) ⊙ up_proj(x)).  x (N, C) -> y (N, C)."""

    def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x):
        a, self.cache = swiglu_forward(self.gate_proj(x), self.up_proj(x))  # (N, F)
        return self.down_proj(a)

    def backward(self, dy):
        dgate, dup = swiglu_backward(self.down_proj.backward(dy), self.cache)  # a = silu(g) ⊙ u
        self.cache = None
        # g, u = gate_proj(x), up_proj(x)  =>  dx = gate_projᵀ dg + up_projᵀ du
        dx = self.gate_proj.backward(dgate)
        dx += self.up_proj.backward(dup)
        return dx


class LlamaDecoderLayer(PreNormBlock):
    """Pre-norm block: h = x + attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h)).
    forward(x, bt, cos, sin, key_padding_mask=None, kv_cache=None); the pass is PreNormBlock's."""

    PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")

    def __init__(self, self_attn: LlamaAttention, mlp: LlamaMLP, input_layernorm: RMSNorm,
                 post_attention_layernorm: RMSNorm):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm


class LlamaModel(Module):
    """embed_tokens, num_hidden_layers decoder layers, final RMSNorm.  ids (B, T) -> h (N, C)."""

    def __init__(self, config: LlamaConfig, backend: Backend, seed: int = 0):
        super().__init__()
        c = config
        init = Init(backend, seed, c.initializer_range)
        self.rng = backend.rng(seed + 1)  # attention-dropout masks
        C, F, H, Hkv, hd = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def linear(d_in, d_out, bias):
            return Linear(init.normal((d_out, d_in)), init.zeros((d_out,)) if bias else None)

        embed = init.normal((c.vocab_size, C))
        if c.pad_token_id is not None:
            embed[c.pad_token_id] = 0  # nn.Embedding's padding_idx row starts at zero, as HF initialises it
        self.embed_tokens = Embedding(embed, padding_idx=c.pad_token_id)
        self.layers = ModuleList([
            LlamaDecoderLayer(
                LlamaAttention(linear(C, H * hd, c.qkv_bias), linear(C, Hkv * hd, c.qkv_bias),
                               linear(C, Hkv * hd, c.qkv_bias), linear(H * hd, C, c.o_bias), H, Hkv,
                               c.attention_dropout, c.layer_sliding_window(i), i, self.rng),
                LlamaMLP(linear(C, F, c.mlp_bias), linear(C, F, c.mlp_bias), linear(F, C, c.mlp_bias)),
                RMSNorm(init.ones((C,)), c.rms_norm_eps),
                RMSNorm(init.ones((C,)), c.rms_norm_eps),
            )
            for i in range(c.num_hidden_layers)
        ])
        self.norm = RMSNorm(init.ones((C,)), c.rms_norm_eps)
        inv_freq, self.attention_scaling = rope_init(c.rope_parameters, hd, c.max_position_embeddings)
        self.inv_freq = backend.asarray(inv_freq)  # (D/2,) in the model's dtype
        self.config = config

    def forward(self, input_ids, position_ids, key_padding_mask=None, kv_cache=None, prefix=None, prompt=None):
        """input_ids (B, T), position_ids (B, T) int, key_padding_mask (B, P+T) bool or None -> h (N, C).
        prefix: per-layer (k_p, v_p) (Hkv, Pk, hd); prompt (Pp, C) put before the tokens' embeddings,
        then T (position_ids, h) counts Pp + the tokens (GPT2Model.forward, adapters/prefix.py)."""
        B, T = input_ids.shape
        Pp = 0 if prompt is None else prompt.shape[0]
        self.cache = (B, T, Pp)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, self.attention_scaling)  # (B, Pp + T, D) each
        x = self.embed_tokens(input_ids)  # (B, T, C)
        if prompt is not None:
            x = prepend_prompt(prompt, x)  # (B, Pp + T, C)
        x = x.reshape(B * (T + Pp), -1)  # (N, C)
        for i, layer in enumerate(self.layers):
            layer.self_attn.prefix = None if prefix is None else prefix[i]
        for layer in self.layers:
            x = layer(x, (B, T + Pp), cos, sin, key_padding_mask, kv_cache)
        return self.norm(x)

    def backward(self, dh):
        """dh (N, C) -> None (gradients accumulate into the parameters)."""
        (B, T, Pp), self.cache = self.cache, None
        dx = self.norm.backward(dh)
        for layer in reversed(self.layers.items):
            dx = layer.backward(dx)
        dx = dx.reshape(B, Pp + T, -1)
        # x = [prompt | E[ids]]  =>  dprompt = Σ_B dx[:, :Pp], dE = scatter(dx[:, Pp:])
        self.prompt_grad = dx[:, :Pp].sum(axis=0) if Pp else None
        self.embed_tokens.backward(dx[:, Pp:])
        return None


class LlamaForCausalLM(Module):
    """A LLaMA-family decoder with its language-model head (lm_head, or embed_tokens when tied).

    forward(input_ids (B, T), attention_mask (B, P+T) or None, labels (B, T) or None,
    position_ids (B, T) or None, kv_cache or None) -> ModelOutput with logits (B, T, V) and loss
    when labels were given; backward(dlogits=None) after a forward without a cache.
    """

    config_class = LlamaConfig
    TIED_EMBEDDING = "model.embed_tokens.weight"  # the parameter a tied head shares

    def __init__(self, config: LlamaConfig, backend: Backend, seed: int = 0):
        super().__init__()
        if type(config) is not self.config_class:
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.model = LlamaModel(config, backend, seed)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(Init(backend, seed + 2, config.initializer_range).normal(
                (config.vocab_size, config.hidden_size)))
        self.config = config
        self.backend = backend

    @property
    def max_positions(self) -> int:
        """The longest P + T a forward takes (max_position_embeddings)."""
        return self.config.max_position_embeddings

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache for ``batch`` sequences of up to ``max_len`` positions (prompt + new tokens)."""
        c = self.config
        if max_len > c.max_position_embeddings:
            raise ValueError(f"a KV cache of {max_len} positions exceeds max_position_embeddings = "
                             f"{c.max_position_embeddings}")
        return KVCache(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim, self.backend)

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, kv_cache=None,
                token_type_ids=None, prefix=None, prompt=None) -> ModelOutput:
        """prefix / prompt: prefix and prompt tuning's virtual tokens (LlamaModel.forward): with a
        prompt, T below is Pp + the tokens; the attention_mask covers a prefix's Pk positions too,
        and the default positions start after them, Pk..Pk+T-1, as transformers' with past keys."""
        c = self.config
        input_ids = to_backend(input_ids, self.backend)
        P, Pk, Pp = virtual_lengths(kv_cache, prefix, prompt)
        check_input_ids(input_ids, c.vocab_size, c.max_position_embeddings - P - Pk - Pp,
                        "max_position_embeddings" + positions_taken(P, Pk, Pp))
        B, T = input_ids.shape
        T += Pp
        xp = get_xp(input_ids)
        if token_type_ids is not None:
            raise ValueError(f"token_type_ids: {type(self).__name__} takes none (pass token_type_ids=None)")
        if kv_cache is not None and labels is not None:
            raise ValueError("labels: a forward with a kv_cache is inference only; pass labels=None")
        mask = check_mask(None if attention_mask is None else to_backend(attention_mask, self.backend),
                          (B, P + Pk + T), "attention_mask" + mask_covers(P, Pk, Pp))
        if position_ids is None:
            P += Pk  # the tokens' positions start after the prefix's
            position_ids = xp.broadcast_to(xp.arange(P, P + T, dtype=xp.int64), (B, T))
        else:
            position_ids = to_backend(position_ids, self.backend)
            check_int_range(position_ids, (B, T), 0, c.max_position_embeddings, "position_ids")
        if labels is not None:
            labels = to_backend(labels, self.backend)
            check_int_range(labels, (B, T), 0, c.vocab_size, "labels", ignore=-100)
        self.cache = None
        h = self.model(input_ids, position_ids, mask, kv_cache, prefix, prompt)  # (N, C)
        if kv_cache is not None:
            kv_cache.advance(T)
        if c.tie_word_embeddings:
            # logits = h Eᵀ (the tied head), (N, C) -> (N, V)
            logits, lin_cache = tied_head_forward(h, self.model.embed_tokens, keep=kv_cache is None)
        else:
            logits, lin_cache = self.lm_head(h), None  # lm_head: a Linear (an adapter may wrap it)
        loss, ce_cache = shifted_loss(logits, labels, B) if labels is not None else (None, None)
        if kv_cache is None:
            self.cache = (lin_cache, ce_cache, (B, T))
        return ModelOutput(logits=logits.reshape(B, T, -1), loss=loss)

    def backward(self, dlogits=None) -> None:
        """Accumulate every parameter gradient: of the loss (dloss = 1) when labels were given and
        ``dlogits`` is None, else of Σ logits ⊙ dlogits (dlogits (B, T, V))."""
        if self.cache is None:
            raise RuntimeError(NO_FORWARD)
        lin_cache, ce_cache, (B, T) = self.cache
        dlogits = upstream_dlogits(dlogits, ce_cache, (B, T, self.config.vocab_size), self.backend)  # (N, V)
        self.cache = None
        if self.config.tie_word_embeddings:
            # logits = h Eᵀ  =>  dh = dlogits E,  dE += dlogitsᵀ h
            dh = tied_head_backward(dlogits, lin_cache, self.model.embed_tokens)
        else:
            dh = self.lm_head.backward(dlogits)
        self.model.backward(dh)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: no biases, sliding-window attention on every layer (MistralConfig)."""

    config_class = MistralConfig


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: q/k/v biases, sliding windows on the layers its layer_types marks (Qwen2Config)."""

    config_class = Qwen2Config


LLAMA_MODEL_CLASSES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}
