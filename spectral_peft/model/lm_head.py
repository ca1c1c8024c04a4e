"""The causal-LM head shared by GPT-2 and the LLaMA family: the tied projection onto the token
embedding, Hugging Face's shifted loss, and the upstream gradient of the logits.

Shape legend: B batch, T positions, N = B·T, C width, V vocabulary; h (N, C), E (V, C).

    logits = h Eᵀ                                  (tied: E is the input embedding)
    loss = mean_t CE(logits[t], labels[t+1])       HF's shift; the last position predicts nothing
"""
from __future__ import annotations

from ..backend import get_xp
from ..inputs import to_backend
from ..ops.linear import linear_backward, linear_forward
from ..ops.loss import cross_entropy_backward, cross_entropy_forward


def tied_head_forward(h, embedding, keep: bool):
    """logits = h Eᵀ (N, C) -> (N, V); the cache keeps h only when E gets a gradient and ``keep``
    (False for inference with a KV cache)."""
    return linear_forward(h, embedding.params["weight"], None, keep_x="weight" not in embedding.frozen and keep)


def tied_head_backward(dlogits, lin_cache, embedding):
    """dh (N, C) of logits = h Eᵀ; dE += dlogitsᵀ h (summed with the embedding's own scatter)."""
    need_dW = "weight" not in embedding.frozen
    # logits = h Eᵀ  =>  dh = dlogits E,  dE = dlogitsᵀ h
    dh, dW, _ = linear_backward(dlogits, lin_cache, embedding.params["weight"], need_dW=need_dW)
    if need_dW:
        embedding.accumulate("weight", dW)
    return dh


def shifted_loss(logits, labels, B: int):
    """(loss, cross-entropy cache) of logits (N, V) against labels (B, T) with HF's shift: position t
    predicts labels[:, t+1] (-100 ignored), the last position nothing."""
    xp = get_xp(logits)
    targets = xp.concatenate([labels[:, 1:], xp.full((B, 1), -100, dtype=labels.dtype)], axis=1)
    return cross_entropy_forward(logits, targets.reshape(-1).astype(xp.int64))


def upstream_dlogits(dlogits, ce_cache, shape: tuple, backend):
    """The (N, V) gradient a head's backward starts from: of the loss (dloss = 1) when ``dlogits`` is
    None (labels must have been given), else the caller's dlogits of shape (B, T, V)."""
    if dlogits is None:
        if ce_cache is None:
            raise ValueError("backward: no labels were given to forward, so pass dlogits (B, T, V)")
        return cross_entropy_backward(1.0, ce_cache)  # (N, V)
    dlogits = to_backend(dlogits, backend)
    if tuple(dlogits.shape) != tuple(shape):
        raise ValueError(f"dlogits must have the logits' shape (B, T, V) = {tuple(shape)}, got {tuple(dlogits.shape)}")
    return dlogits.reshape(shape[0] * shape[1], shape[2])


NO_FORWARD = ("backward called without a forward (or twice after one forward, or after a forward with a "
              "kv_cache, which is inference only)")
