"""The parameter-holding layers the models are built from, besides Linear: Embedding, LayerNorm, RMSNorm,
and the parameter-free Dropout and Activation wrappers. Each wraps one op pair of
:mod:`spectral_peft.ops` in the Module contract (module.py).

Shape legend: ids int S (usually (B, T)); V rows of a table; C width; x, y (..., C).
"""
from __future__ import annotations

from ..module import Module
from ..ops.activation import get_activation
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.embedding import embedding_backward, embedding_forward
from ..ops.norm import layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward


class Embedding(Module):
    """out = weight[ids].  ids int S -> out S + (C,); ``params["weight"]`` (V, C).

    The backward scatter-adds into grads["weight"] and returns None (ids have no gradient).
    ``padding_idx`` (PyTorch's nn.Embedding argument, BERT's pad_token_id): that row gets no
    gradient, as in PyTorch.
    """

    def __init__(self, weight, padding_idx: int | None = None):
        super().__init__()
        if weight.ndim != 2:
            raise ValueError(f"Embedding weight must be 2-D (V, C), got shape {tuple(weight.shape)}")
        if padding_idx is not None and not 0 <= padding_idx < weight.shape[0]:
            raise ValueError(f"Embedding padding_idx must be in [0, {weight.shape[0]}), got {padding_idx}")
        self.params["weight"] = weight
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.params["weight"].shape[0]

    def forward(self, ids):
        out, self.cache = embedding_forward(ids, self.params["weight"])  # S -> S + (C,)
        return out

    def backward(self, dout):
        if "weight" not in self.frozen:
            # out = W[ids]  =>  dW[v] = Σ_{ids = v} dout
            dW = embedding_backward(dout, self.cache)  # (V, C)
            if self.padding_idx is not None:
                dW[self.padding_idx] = 0  # PyTorch's padding_idx: the pad row is never updated
            self.accumulate("weight", dW)
        self.cache = None
        return None


class LayerNorm(Module):
    """y = (x - μ)/sqrt(σ² + eps) ⊙ weight + bias over the last axis.  x (..., C) -> y (..., C)."""

    def __init__(self, weight, bias, eps: float):
        super().__init__()
        self.params["weight"] = weight
        self.params["bias"] = bias
        self.eps = float(eps)

    def forward(self, x):
        y, self.cache = layernorm_forward(x, self.params["weight"], self.params["bias"], self.eps)
        return y

    def backward(self, dy):
        # a frozen norm (LoRA's base) asks for dx alone: no column sums for gradients it would drop
        need = "weight" not in self.frozen or "bias" not in self.frozen
        dx, dw, db = layernorm_backward(dy, self.cache, self.params["weight"], need_dparams=need)
        if "weight" not in self.frozen:
            self.accumulate("weight", dw)
        if "bias" not in self.frozen:
            self.accumulate("bias", db)
        self.cache = None
        return dx


class RMSNorm(Module):
    """y = x / sqrt(mean(x²) + eps) ⊙ weight over the last axis (LLaMA's norm, no bias).  x (..., C) -> y (..., C)."""

    def __init__(self, weight, eps: float):
        super().__init__()
        self.params["weight"] = weight
        self.eps = float(eps)

    def forward(self, x):
        y, self.cache = rmsnorm_forward(x, self.params["weight"], self.eps)
        return y

    def backward(self, dy):
        dx, dw = rmsnorm_backward(dy, self.cache, self.params["weight"], need_dparams="weight" not in self.frozen)
        if "weight" not in self.frozen:
            self.accumulate("weight", dw)
        self.cache = None
        return dx


class Dropout(Module):
    """Inverted dropout with probability ``p``, masks drawn from ``rng`` (shared with the model so a
    seed fixes every mask). Identity in eval mode or when p == 0.  x (...) -> y (...)."""

    def __init__(self, p: float, rng):
        super().__init__()
        self.p = float(p)
        self.rng = rng

    def forward(self, x):
        y, self.cache = dropout_forward(x, self.p, self.rng, self.training)
        return y

    def backward(self, dy):
        dx = dropout_backward(dy, self.cache)
        self.cache = None
        return dx


class Activation(Module):
    """An element-wise activation by its Hugging Face name ("gelu_new", "gelu", "relu", "tanh"...)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fns = get_activation(name)

    def forward(self, x):
        y, self.cache = self.fns.forward(x)
        return y

    def backward(self, dy):
        dx = self.fns.backward(dy, self.cache)
        self.cache = None
        return dx


class PreNormBlock(Module):
    """The pre-norm residual block of GPT-2 and the LLaMA family, (N, C) -> (N, C):

        h = x + attn(norm1(x), *attn_args);   out = h + mlp(norm2(h))

    A subclass names its four sub-modules as Hugging Face does (``PARTS``: norm1, attn, norm2,
    mlp in that order) and builds them; the forward and backward are written once, here.
    """

    PARTS: tuple[str, str, str, str] = ("norm1", "attn", "norm2", "mlp")

    def _parts(self):
        return [getattr(self, name) for name in self.PARTS]

    def forward(self, x, *attn_args):
        norm1, attn, norm2, mlp = self._parts()
        h = attn(norm1(x), *attn_args)
        h += x  # h = x + attn(norm1(x)); the attention output is a fresh array, added into in place
        out = mlp(norm2(h))
        out += h
        return out

    def backward(self, dout):
        norm1, attn, norm2, mlp = self._parts()
        # out = h + mlp(norm2(h))  =>  dh = dout + norm2ᵀ mlpᵀ dout   (fan-out of h)
        dh = norm2.backward(mlp.backward(dout))
        dh += dout
        # h = x + attn(norm1(x))  =>  dx = dh + norm1ᵀ attnᵀ dh
        dx = norm1.backward(attn.backward(dh))
        dx += dh
        return dx
