"""BERT as Modules: BertModel (encoder + pooler) and BertForSequenceClassification.

Shape legend: B batch, T sequence, C = hidden_size, H = num_attention_heads, hd = C/H,
F = intermediate_size, K = num_labels, N = B·T.

    x = drop(LN(word[ids] + pos[0..T-1] + type[token_type_ids]))       (B, T, C)
    for each layer (post-LayerNorm):
        c = SDPA(query(x), key(x), value(x), key padding mask)           (B, T, C), no causal mask
        a = LN_1(drop(dense_o(c)) + x)                                   attention.output
        x = LN_2(drop(dense_2(act(dense_1(a)))) + a)                     intermediate, output
    pooled = tanh(pooler.dense(x[:, 0]))                                  (B, C)
    logits = classifier(drop(pooled))                                     (B, K)
    loss: K > 1: mean cross-entropy against labels (B,) int; K = 1: mean squared error (regression)

Inside the encoder the activations are kept 2-D, (N, C), so every projection is one GEMM; only
the attention reshapes to (B, H, T, hd). Dropout (training mode only): hidden_dropout_prob on the
embeddings, each sub-layer's output and the pooled vector; attention_probs_dropout_prob on the
attention probabilities.

Attribute names are Hugging Face's (``bert.encoder.layer.0.attention.self.query.weight``).
"""
from __future__ import annotations

from ..backend import Backend, get_xp
from ..inputs import check_input_ids, check_int_range, check_mask, to_backend
from ..module import Linear, Module, ModuleList
from ..ops.attention import (
    attention_backward,
    attention_forward,
    merge_heads,
    split_heads,
)
from ..ops.loss import cross_entropy_backward, cross_entropy_forward
from .config import BertConfig
from .gpt2 import Init
from .layers import Activation, Dropout, Embedding
from .output import ModelOutput


class BertEmbeddings(Module):
    """ids (B, T), token_type_ids (B, T) -> drop(LN(word + position + token type)) (N, C)."""

    def __init__(self, c: BertConfig, init: Init, rng):
        super().__init__()
        C = c.hidden_size
        self.word_embeddings = Embedding(init.normal((c.vocab_size, C)), padding_idx=c.pad_token_id)
        self.position_embeddings = Embedding(init.normal((c.max_position_embeddings, C)))
        self.token_type_embeddings = Embedding(init.normal((c.type_vocab_size, C)))
        self.LayerNorm = init.layernorm(C, c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout_prob, rng)

    def forward(self, input_ids, token_type_ids):
        T = input_ids.shape[1]
        xp = get_xp(self.word_embeddings.params["weight"])
        x = self.word_embeddings(input_ids)  # (B, T) -> (B, T, C)
        x += self.position_embeddings(xp.arange(T))  # + (T, C), broadcast over B
        x += self.token_type_embeddings(token_type_ids)  # + (B, T, C)
        self.cache = input_ids.shape
        return self.dropout(self.LayerNorm(x.reshape(-1, x.shape[-1])))  # (N, C)

    def backward(self, dy):
        """dy (N, C) -> None."""
        ids_shape, self.cache = self.cache, None
        dx = self.LayerNorm.backward(self.dropout.backward(dy)).reshape(*ids_shape, -1)  # (B, T, C)
        # x = word[ids] + pos[arange T] + type[tt]  =>  each table gets dx (pos: summed over B)
        self.word_embeddings.backward(dx)
        self.position_embeddings.backward(dx.sum(axis=0))  # (B, T, C) -> (T, C)
        self.token_type_embeddings.backward(dx)
        return None


class BertSelfAttention(Module):
    """x (N, C) -> context (N, C): SDPA over H heads of query/key/value projections (N = B·T)."""

    def __init__(self, query: Linear, key: Linear, value: Linear, n_head: int, attn_pdrop: float, rng):
        super().__init__()
        self.query = query
        self.key = key
        self.value = value
        self.n_head = n_head
        self.attn_pdrop = attn_pdrop  # dropout on the attention probabilities (HF's self.dropout)
        self.rng = rng

    def forward(self, x, bt, key_padding_mask=None):
        B, T = bt
        H, C = self.n_head, x.shape[-1]
        q = split_heads(self.query(x).reshape(B, T, C), H)  # (N, C) -> (B, T, C) -> (B, H, T, hd)
        k = split_heads(self.key(x).reshape(B, T, C), H)
        v = split_heads(self.value(x).reshape(B, T, C), H)
        p = self.attn_pdrop if self.training else 0.0
        out, attn_cache = attention_forward(q, k, v, causal=False, key_padding_mask=key_padding_mask,
                                            dropout_p=p, rng=self.rng)
        self.cache = (attn_cache, (B, T))
        return merge_heads(out).reshape(B * T, C)  # (B, H, T, hd) -> (N, C)

    def backward(self, dctx):
        attn_cache, (B, T) = self.cache
        self.cache = None
        C = dctx.shape[-1]
        # ctx = merge_heads(out)  =>  dout = split_heads(dctx)
        dq, dk, dv = attention_backward(split_heads(dctx.reshape(B, T, C), self.n_head), attn_cache)
        # q = query(x), k = key(x), v = value(x)  =>  dx = Σ of the three (fan-out of x)
        dx = self.query.backward(merge_heads(dq).reshape(B * T, C))
        dx += self.key.backward(merge_heads(dk).reshape(B * T, C))
        dx += self.value.backward(merge_heads(dv).reshape(B * T, C))
        return dx


class BertResidualOutput(Module):
    """HF's BertSelfOutput / BertOutput: y = LN(drop(dense(h)) + x).  h (N, d_in), x (N, C)."""

    def __init__(self, dense: Linear, layernorm, p: float, rng):
        super().__init__()
        self.dense = dense
        self.LayerNorm = layernorm
        self.dropout = Dropout(p, rng)

    def forward(self, h, x):
        z = self.dropout(self.dense(h))
        z = z + x  # a new array: z may be h's dense output held by nobody else, but x is the caller's
        return self.LayerNorm(z)

    def backward(self, dy):
        """-> (dh, dx) of y = LN(drop(dense(h)) + x)."""
        dz = self.LayerNorm.backward(dy)
        # z = drop(dense(h)) + x  =>  dx = dz, dh = denseᵀ dropᵀ dz
        dh = self.dense.backward(self.dropout.backward(dz))
        return dh, dz


class BertAttention(Module):
    """a = LN(drop(dense(self_attn(x))) + x).  (N, C) -> (N, C)."""

    def __init__(self, self_attn: BertSelfAttention, output: BertResidualOutput):
        super().__init__()
        self.self = self_attn  # HF's attribute name: ...attention.self.query
        self.output = output

    def forward(self, x, bt, key_padding_mask=None):
        return self.output(self.self(x, bt, key_padding_mask), x)

    def backward(self, da):
        dctx, dx = self.output.backward(da)
        dx = dx + self.self.backward(dctx)  # fan-out of x: residual + attention
        return dx


class BertIntermediate(Module):
    """act(dense(a)).  (N, C) -> (N, F)."""

    def __init__(self, dense: Linear, act: str):
        super().__init__()
        self.dense = dense
        self.intermediate_act_fn = Activation(act)

    def forward(self, a):
        return self.intermediate_act_fn(self.dense(a))

    def backward(self, dy):
        return self.dense.backward(self.intermediate_act_fn.backward(dy))


class BertLayer(Module):
    """One post-LN encoder layer.  (N, C) -> (N, C)."""

    def __init__(self, attention: BertAttention, intermediate: BertIntermediate, output: BertResidualOutput):
        super().__init__()
        self.attention = attention
        self.intermediate = intermediate
        self.output = output

    def forward(self, x, bt, key_padding_mask=None):
        a = self.attention(x, bt, key_padding_mask)
        return self.output(self.intermediate(a), a)

    def backward(self, dy):
        di, da = self.output.backward(dy)
        # y = LN(drop(dense(inter(a))) + a)  =>  da = dz + interᵀ denseᵀ dz   (fan-out of a)
        da = da + self.intermediate.backward(di)
        return self.attention.backward(da)


class BertEncoder(Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = ModuleList(layers)

    def forward(self, x, bt, key_padding_mask=None):
        for layer in self.layer:
            x = layer(x, bt, key_padding_mask)
        return x

    def backward(self, dy):
        for layer in reversed(self.layer.items):
            dy = layer.backward(dy)
        return dy


class BertPooler(Module):
    """pooled = tanh(dense(x[:, 0])).  (B, T, C) -> (B, C)."""

    def __init__(self, dense: Linear):
        super().__init__()
        self.dense = dense
        self.activation = Activation("tanh")

    def forward(self, x):
        self.cache = x.shape
        return self.activation(self.dense(x[:, 0]))  # (B, C) -> (B, C)

    def backward(self, dpooled):
        """-> dx (B, T, C), zero except at position 0."""
        shape = self.cache
        self.cache = None
        d0 = self.dense.backward(self.activation.backward(dpooled))  # (B, C)
        dx = get_xp(d0).zeros(shape, dtype=d0.dtype)
        dx[:, 0] = d0  # pooled = f(x[:, 0])  =>  dx[:, 0] = fᵀ dpooled
        return dx


def _build_bert(model: Module, c: BertConfig, backend: Backend, seed: int, add_pooling_layer: bool):
    init = Init(backend, seed, c.initializer_range)
    rng = backend.rng(seed + 1)
    C, F, eps, p = c.hidden_size, c.intermediate_size, c.layer_norm_eps, c.hidden_dropout_prob
    model.embeddings = BertEmbeddings(c, init, rng)
    model.encoder = BertEncoder([
        BertLayer(
            BertAttention(
                BertSelfAttention(init.linear(C, C), init.linear(C, C), init.linear(C, C), c.num_attention_heads,
                                  c.attention_probs_dropout_prob, rng),
                BertResidualOutput(init.linear(C, C), init.layernorm(C, eps), p, rng)),
            BertIntermediate(init.linear(C, F), c.hidden_act),
            BertResidualOutput(init.linear(F, C), init.layernorm(C, eps), p, rng))
        for _ in range(c.num_hidden_layers)])
    model.pooler = BertPooler(init.linear(C, C)) if add_pooling_layer else None
    return init, rng


def _check_bert_inputs(model, input_ids, attention_mask, token_type_ids):
    c = model.config
    input_ids = to_backend(input_ids, model.backend)
    check_input_ids(input_ids, c.vocab_size, c.max_position_embeddings, "max_position_embeddings")
    B, T = input_ids.shape
    mask = check_mask(None if attention_mask is None else to_backend(attention_mask, model.backend), (B, T))
    xp = get_xp(input_ids)
    if token_type_ids is None:
        token_type_ids = xp.zeros((B, T), dtype=xp.int64)  # HF's default: every token in segment A
    else:
        token_type_ids = to_backend(token_type_ids, model.backend)
        check_int_range(token_type_ids, (B, T), 0, c.type_vocab_size, "token_type_ids")
    return input_ids, mask, token_type_ids


class BertModel(Module):
    """The encoder (and pooler).  forward(input_ids (B, T), attention_mask, token_type_ids) ->
    ModelOutput(last_hidden_state (B, T, C), pooler_output (B, C) or None).

    backward(dlogits) takes the gradient of last_hidden_state (B, T, C); ``d_pooled`` (B, C)
    optionally adds one of pooler_output.
    """

    def __init__(self, config: BertConfig, backend: Backend, seed: int = 0, add_pooling_layer: bool = True):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"{type(self).__name__} needs a BertConfig, got {type(config).__name__}")
        _build_bert(self, config, backend, seed, add_pooling_layer)
        self.config = config
        self.backend = backend

    def encode(self, input_ids, mask, token_type_ids):
        """Validated inputs -> (last_hidden_state (B, T, C), pooled (B, C) or None)."""
        B, T = input_ids.shape
        x = self.encoder(self.embeddings(input_ids, token_type_ids), (B, T), mask)  # (N, C)
        x = x.reshape(B, T, -1)  # (N, C) -> (B, T, C), a view
        pooled = self.pooler(x) if self.pooler is not None else None
        return x, pooled

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None) -> ModelOutput:
        if labels is not None:
            raise ValueError("labels: a bare BertModel has no head and no loss; pass labels=None")
        ids, mask, tt = _check_bert_inputs(self, input_ids, attention_mask, token_type_ids)
        self.cache = tuple(ids.shape)
        x, pooled = self.encode(ids, mask, tt)
        return ModelOutput(last_hidden_state=x, pooler_output=pooled)

    def backward(self, dlogits=None, d_pooled=None) -> None:
        """dlogits: gradient of last_hidden_state (B, T, C) (or None); d_pooled: of pooler_output (B, C)."""
        if self.cache is None:
            raise RuntimeError("backward called without a forward (or twice after one forward)")
        B, T = self.cache
        C = self.config.hidden_size
        if dlogits is None and d_pooled is None:
            raise ValueError("backward: a BertModel has no loss; pass dlogits = d last_hidden_state (B, T, C)")
        dx = None
        if dlogits is not None:
            dlogits = to_backend(dlogits, self.backend)
            if tuple(dlogits.shape) != (B, T, C):
                raise ValueError(f"dlogits must have last_hidden_state's shape (B, T, C) = {(B, T, C)}, got {tuple(dlogits.shape)}")
            dx = dlogits
        if d_pooled is not None:
            if self.pooler is None:
                raise ValueError("d_pooled: this BertModel has no pooler")
            dp = self.pooler.backward(d_pooled)
            dx = dp if dx is None else dp + dx
        elif self.pooler is not None:
            self.pooler.cache = None  # the pooler gets no gradient: pooler_output was not used
        self.cache = None
        self.embeddings.backward(self.encoder.backward(dx.reshape(B * T, C)))


class BertForSequenceClassification(Module):
    """BERT with a classifier on the pooled first token.

    forward(input_ids (B, T), attention_mask (B, T), labels (B,), token_type_ids (B, T)) ->
    ModelOutput(logits (B, K), loss). labels: int class ids in [0, K) when K > 1 (cross-entropy),
    float targets when K = 1 (mean squared error), as transformers chooses.
    """

    def __init__(self, config: BertConfig, backend: Backend, seed: int = 0):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"BertForSequenceClassification needs a BertConfig, got {type(config).__name__}")
        self.bert = BertModel(config, backend, seed, add_pooling_layer=True)
        init = Init(backend, seed + 2, config.initializer_range)
        self.dropout = Dropout(config.hidden_dropout_prob, backend.rng(seed + 3))
        self.classifier = init.linear(config.hidden_size, config.num_labels)
        self.config = config
        self.backend = backend

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None) -> ModelOutput:
        c = self.config
        ids, mask, tt = _check_bert_inputs(self.bert, input_ids, attention_mask, token_type_ids)
        B = ids.shape[0]
        if labels is not None:
            labels = to_backend(labels, self.backend)
            if c.num_labels == 1:
                if not hasattr(labels, "dtype") or labels.dtype.kind not in "fiu" or tuple(labels.shape) != (B,):
                    raise ValueError(f"labels: num_labels = 1 (regression) needs numeric targets of shape (B,) = ({B},), "
                                     f"got {getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
            else:
                check_int_range(labels, (B,), 0, c.num_labels, "labels")
        self.cache = None
        self.bert.cache = (B, ids.shape[1])
        _, pooled = self.bert.encode(ids, mask, tt)
        logits = self.classifier(self.dropout(pooled))  # (B, C) -> (B, K)
        loss, loss_cache = None, None
        if labels is not None:
            if c.num_labels == 1:
                # L = mean_b (logit_b - y_b)²   (HF's MSELoss on squeezed logits)
                r = logits[:, 0] - labels.astype(logits.dtype)  # (B,)
                loss, loss_cache = float((r * r).mean()), ("mse", r)
            else:
                loss, ce = cross_entropy_forward(logits, labels.astype(get_xp(logits).int64))
                loss_cache = ("ce", ce)
        self.cache = (loss_cache, logits.shape)
        return ModelOutput(logits=logits, loss=loss)

    def backward(self, dlogits=None) -> None:
        if self.cache is None:
            raise RuntimeError("backward called without a forward (or twice after one forward)")
        loss_cache, shape = self.cache
        if dlogits is None:
            if loss_cache is None:
                raise ValueError(f"backward: no labels were given to forward, so pass dlogits {tuple(shape)}")
            kind, c = loss_cache
            if kind == "ce":
                dlogits = cross_entropy_backward(1.0, c)
            else:
                # L = mean (logit - y)²  =>  dlogit = 2 (logit - y) / B
                dlogits = (2.0 / c.shape[0]) * c[:, None]
        else:
            dlogits = to_backend(dlogits, self.backend)
            if tuple(dlogits.shape) != tuple(shape):
                raise ValueError(f"dlogits must have the logits' shape {tuple(shape)}, got {tuple(dlogits.shape)}")
        self.cache = None
        dpooled = self.dropout.backward(self.classifier.backward(dlogits))
        self.bert.backward(None, dpooled)
