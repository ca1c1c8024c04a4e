"""Stateless forward/backward pairs: ``op_forward(...) -> (out, cache)``, ``op_backward(dout, cache,
...) -> grads``. One file per operation; docs/ops.md derives each backward.

Shape legend: B batch, T sequence, C width, H heads, hd = C/H, V vocabulary, N = B·T tokens.
"""
from .activation import (ACTIVATIONS, Activation, gelu_backward, gelu_forward, get_activation,
                         relu_backward, relu_forward, silu_backward, silu_forward, tanh_backward,
                         tanh_forward)
from .attention import (attention_backward, attention_forward, merge_heads, merge_heads_backward,
                        s2_attention_backward, s2_attention_forward, split_heads, split_heads_backward)
from .dropout import dropout_backward, dropout_forward
from .embedding import embedding_backward, embedding_forward
from .linear import linear_backward, linear_forward
from .loss import cross_entropy_backward, cross_entropy_forward
from .norm import layernorm_backward, layernorm_forward, rmsnorm_backward, rmsnorm_forward
from .residual import fanout_backward, residual_backward, residual_forward
from .softmax import softmax_backward, softmax_forward

__all__ = [
    "ACTIVATIONS", "Activation", "attention_backward", "attention_forward", "cross_entropy_backward",
    "cross_entropy_forward", "dropout_backward", "dropout_forward", "embedding_backward",
    "embedding_forward", "fanout_backward", "gelu_backward", "gelu_forward", "get_activation",
    "layernorm_backward", "layernorm_forward", "linear_backward", "linear_forward", "merge_heads",
    "merge_heads_backward", "relu_backward", "relu_forward", "residual_backward", "residual_forward",
    "rmsnorm_backward", "rmsnorm_forward", "s2_attention_backward", "s2_attention_forward", "silu_backward", "silu_forward", "softmax_backward",
    "softmax_forward", "split_heads", "split_heads_backward", "tanh_backward", "tanh_forward",
]
