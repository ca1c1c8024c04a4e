"""KV-cache generation for the causal LMs (GPT-2, Llama, Mistral, Qwen2), greedy or sampled, as
transformers' ``generate`` computes it.

Shape legend: B batch, T prompt length, N max_new_tokens, n <= N tokens generated, V vocabulary,
M = T + N positions in the cache.

    cache = model.new_kv_cache(B, M)                     keys/values preallocated once (KVCache)
    pos = cumsum(mask) - 1, 1 where mask = 0             (B, T) position ids, as transformers
    logits = model(prompt, mask, pos, cache)[:, -1]      the prompt in one forward
    repeat n times:
        token = argmax(logits)  or  sample(warp(logits))  (B,)
        mask = [mask | 1], pos = last pos + 1
        logits = model(token, mask, pos, cache)[:, -1]   one position per step, attending over the cache

Batches are left-padded (pads first, as transformers' batched generation requires: with right
padding the new tokens would follow pads). A pad's own position id is 1, as transformers fills it;
no real token attends to a pad, so its value changes nothing but the pad rows' own outputs.

Sampling applies, in transformers' order, temperature (logits / T), top-k (keep the k largest) and
top-p (keep the smallest set of largest probabilities whose sum reaches p, at least one token),
then draws from softmax of what is left with a host NumPy generator seeded by ``seed``. The draws
are not PyTorch's, so sampled tokens are reproducible here but not equal to transformers'; the
warped distribution is (tests/test_generation.py). Unlike transformers' default generation config,
no top_k = 50 is applied unless asked for.

Prefix and prompt tuning (a PeftModel with a prompt encoder, adapters/prefix.py) generate as PEFT's
PeftModelForCausalLM.generate does, M = Pv + T + N with Pv = num_virtual_tokens: a prefix fills the
cache's positions 0..Pv-1 before the prompt's forward and the tokens' positions are offset by Pv;
a prompt's embeddings go before the first forward's input embeddings only and the positions are
the cache's (0..Pv+T-1, then one more per step), whatever the padding; both extend the mask by Pv
ones at every step. The encoder's forward does it (PrefixEncoder / PromptEmbedding.model_forward).

With ``eos_token_id``, a row that has produced it is finished: later tokens are ``pad_token_id``
(default: the eos id, as transformers substitutes) and generation stops when every row is finished.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import to_host
from .inputs import check_input_ids, check_int_range, check_mask
from .validation import check_int


@dataclass
class GenerateOutput:
    """sequences (B, T+n) int64: the prompt then the new tokens; logits (B, n, V): the model's
    logits each new token was chosen from, before any warping (transformers' output_logits);
    cache_bytes: the bytes of the preallocated KV cache."""

    sequences: np.ndarray
    logits: np.ndarray
    cache_bytes: int


def causal_lm(model):
    """The model under a PeftModel (or the model itself); it must be a causal LM with a KV cache."""
    base = getattr(model, "model", model) if hasattr(model, "peft_config") else model
    if not hasattr(base, "new_kv_cache"):
        raise TypeError(f"generate needs a causal LM (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, "
                        f"Qwen2ForCausalLM), got {type(base).__name__}")
    return base


def check_left_padded(mask: np.ndarray) -> None:
    """mask (B, T) bool: each row must be pads then real tokens, with at least one real token."""
    empty = ~mask.any(axis=1)
    if empty.any():
        raise ValueError(f"attention_mask: row {int(np.argmax(empty))} has no real token (all 0)")
    late_pad = (mask[:, :-1] & ~mask[:, 1:]).any(axis=1)  # a 1 followed by a 0
    if late_pad.any():
        raise ValueError(f"attention_mask: row {int(np.argmax(late_pad))} has padding after a real token; batched "
                         "generation needs left padding (pads first, as tokenizer padding_side='left')")


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """mask (B, T) bool -> position ids (B, T) int64: cumsum(mask) - 1 on real tokens, 1 on pads
    (transformers' prepare_inputs_for_generation)."""
    pos = np.cumsum(mask, axis=1, dtype=np.int64) - 1
    pos[~mask] = 1
    return pos


def _check_sampling(do_sample, temperature, top_k, top_p) -> None:
    if not do_sample:
        given = [n for n, v, d in (("temperature", temperature, 1.0), ("top_k", top_k, None), ("top_p", top_p, None))
                 if v != d]
        if given:
            raise ValueError(f"{given[0]} only applies when sampling: pass do_sample=True (--do_sample) or drop it")
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None:
        check_int("generate", "top_k", top_k, min=1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


def warp_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> np.ndarray:
    """logits (B, V) -> scores (B, V) with -inf on the removed tokens, in transformers' order:
    temperature, top-k, top-p (at least one token kept)."""
    scores = logits / temperature if temperature != 1.0 else logits.copy()
    if top_k is not None and top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k, None]  # (B, 1): the k-th largest
        scores[scores < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
        s = np.take_along_axis(scores, order, axis=-1)
        p = np.exp(s - s[:, -1:])
        cum = np.cumsum(p / p.sum(axis=-1, keepdims=True), axis=-1)
        remove = cum <= 1 - top_p  # the low-probability tail whose mass is at most 1 - p
        remove[:, -1] = False  # the most probable token always stays
        np.put_along_axis(scores, order, np.where(remove, -np.inf, s), axis=-1)
    return scores


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """scores (B, V) -> one token per row (B,) int64 drawn from softmax(scores)."""
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(scores.shape[0])[:, None] * cdf[:, -1:]  # (B, 1) uniform on [0, total)
    return np.minimum((cdf <= u).sum(axis=-1), scores.shape[-1] - 1).astype(np.int64)


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_id: int | None = None, pad_token_id: int | None = None) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens after the left-padded prompt ``input_ids`` (B, T)
    (host or device ints) with the KV cache; ``model`` is a causal LM or a PeftModel around one
    (its adapters computed at every step). Every argument is checked before any work."""
    base = causal_lm(model)
    ids = np.asarray(to_host(input_ids))
    V = base.config.vocab_size
    encoder = getattr(model, "prompt_encoder", None)
    Pv = 0 if encoder is None else encoder.P  # prefix / prompt tuning's virtual positions in the cache
    taken = f" - {Pv} virtual tokens" if Pv else ""
    check_input_ids(ids, V, base.max_positions - Pv, "the model's maximum positions" + taken)
    B, T = ids.shape
    check_int("generate", "max_new_tokens", max_new_tokens, min=1)
    if Pv + T + max_new_tokens > base.max_positions:
        raise ValueError(f"max_new_tokens: {f'{Pv} virtual tokens + ' if Pv else ''}the prompt's {T} tokens + "
                         f"{max_new_tokens} new ones exceed the model's {base.max_positions} positions "
                         "(n_positions / max_position_embeddings)")
    mask = check_mask(None if attention_mask is None else np.asarray(to_host(attention_mask)), (B, T))
    mask = np.ones((B, T), bool) if mask is None else mask
    check_left_padded(mask)
    _check_sampling(do_sample, temperature, top_k, top_p)
    for name, tok in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if tok is not None:
            check_int_range(np.asarray([tok]), (1,), 0, V, name)
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    check_int("generate", "seed", seed, min=0)

    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    try:
        cache = base.new_kv_cache(B, Pv + T + max_new_tokens)
        pos = position_ids_from_mask(mask)
        out = model.forward(ids.astype(np.int64), attention_mask=mask, position_ids=pos, kv_cache=cache)
        tokens, step_logits = [], []
        unfinished = np.ones(B, bool)
        for step in range(max_new_tokens):
            logits = np.asarray(to_host(out.logits[:, -1]))  # (B, V)
            step_logits.append(logits)
            if do_sample:
                nxt = sample(warp_logits(logits.astype(np.float64), temperature, top_k, top_p), rng)
            else:
                nxt = np.argmax(logits, axis=-1).astype(np.int64)  # the first maximum, as torch.argmax
            if eos_token_id is not None:
                nxt = np.where(unfinished, nxt, pad)
                unfinished &= nxt != eos_token_id
            tokens.append(nxt)
            if not unfinished.any() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((B, 1), bool)], axis=1)
            pos = pos[:, -1:] + 1
            out = model.forward(nxt[:, None], attention_mask=mask, position_ids=pos, kv_cache=cache)
    finally:
        model.train(was_training)
    sequences = np.concatenate([ids.astype(np.int64), np.stack(tokens, axis=1)], axis=1)
    return GenerateOutput(sequences=sequences, logits=np.stack(step_logits, axis=1), cache_bytes=cache.nbytes)
