"""The float64 answers of the conformance suite: each contract function computed by the engine's
own layers and ops (the code the rest of the project tests against transformers, PEFT and
bitsandbytes), from the very arrays the target received, widened to float64.

Every function here takes the contract's keyword arguments (float arrays already float64) and
returns the contract's dict of NumPy arrays.
"""
from __future__ import annotations

import numpy as np

from ..adapters.adalora import AdaLoraLinear
from ..adapters.adalora_allocator import budget_schedule
from ..adapters.dora import M_KEY, DoraLinear
from ..adapters.lora import A_KEY, B_KEY, LoraLinear
from ..backend import host_rng
from ..module import Linear
from ..ops.activation import swiglu_backward, swiglu_forward
from ..ops.attention import attention_backward, attention_forward
from ..ops.loss import cross_entropy_backward, cross_entropy_forward
from ..ops.norm import rmsnorm_backward, rmsnorm_forward
from ..ops.rope import rope_backward, rope_cos_sin, rope_forward
from ..quant.blockwise import dequantize_4bit_reference, quantize_4bit_reference
from ..sparse.csr import CSR
from ..sparse.kernels import sddmm, spmm, spmm_t


def _base(weight, bias) -> Linear:
    return Linear(weight.copy(), None if bias is None else bias.copy())


def _run_layer(layer, x, grad_output, names: dict) -> dict:
    """forward(x), backward(grad_output) of an adapter layer -> output, grad_x and the named grads."""
    out = layer.forward(x)
    dx = layer.backward(grad_output)
    result = {"output": out, "grad_x": dx}
    for key, name in names.items():
        result[name] = layer.grads[key]
    return result


def lora(x, weight, bias, lora_A, lora_B, scaling, grad_output):
    r = lora_A.shape[0]
    layer = LoraLinear(_base(weight, bias), r=r, rng=host_rng(0))
    layer.scaling = float(scaling)
    layer.params[A_KEY], layer.params[B_KEY] = lora_A.copy(), lora_B.copy()
    return _run_layer(layer, x, grad_output, {A_KEY: "grad_lora_A", B_KEY: "grad_lora_B"})


def dora(x, weight, bias, lora_A, lora_B, lora_magnitude, scaling, grad_output):
    layer = DoraLinear(_base(weight, bias), r=lora_A.shape[0], rng=host_rng(0))
    layer.scaling = float(scaling)
    layer.params[A_KEY], layer.params[B_KEY] = lora_A.copy(), lora_B.copy()
    layer.params[M_KEY] = lora_magnitude.copy()
    return _run_layer(layer, x, grad_output, {A_KEY: "grad_lora_A", B_KEY: "grad_lora_B",
                                              M_KEY: "grad_lora_magnitude"})


def adalora(x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, grad_output):
    layer = AdaLoraLinear(_base(weight, bias), r=lora_A.shape[0], lora_alpha=float(scaling), ranknum=ranknum,
                          rng=host_rng(0))
    for k, v in (("lora_A", lora_A), ("lora_E", lora_E), ("lora_B", lora_B)):
        layer.params[k] = v.copy()
    return _run_layer(layer, x, grad_output, {"lora_A": "grad_lora_A", "lora_E": "grad_lora_E",
                                              "lora_B": "grad_lora_B"})


def rosa(x, weight, bias, lora_A, lora_B, scaling, sparse_indptr, sparse_indices, sparse_values, grad_output):
    """LoRA's layer plus the engine's sparse kernels: y += x Sᵀ, dx += dy S, dS_values = SDDMM(dy, x)."""
    result = lora(x, weight, bias, lora_A, lora_B, scaling, grad_output)
    S = CSR(sparse_values.copy(), sparse_indptr, sparse_indices, weight.shape)
    result["output"] = result["output"] + spmm(S, x)  # y = x (W + S)ᵀ + b + s·(x Aᵀ)Bᵀ
    result["grad_x"] = result["grad_x"] + spmm_t(S, grad_output)  # => dx += dy S
    result["grad_sparse_values"] = sddmm(grad_output, x, S)  # => dS = (dyᵀ x) on the support
    return result


def attention(q, k, v, causal, key_padding_mask, grad_output):
    out, cache = attention_forward(q, k, v, causal=bool(causal), key_padding_mask=key_padding_mask)
    dq, dk, dv = attention_backward(grad_output, cache)
    return {"output": out, "grad_q": dq, "grad_k": dk, "grad_v": dv}


def rmsnorm(x, weight, eps, grad_output):
    y, cache = rmsnorm_forward(x, weight, float(eps))
    dx, dw = rmsnorm_backward(grad_output, cache, weight)
    return {"output": y, "grad_x": dx, "grad_weight": dw}


def rope(x, position_ids, inv_freq, grad_output):
    cos, sin = rope_cos_sin(position_ids, inv_freq)  # (B, T, D) each
    y, cache = rope_forward(x, cos, sin)
    return {"output": y, "grad_x": rope_backward(grad_output, cache)}


def swiglu(gate, up, grad_output):
    y, cache = swiglu_forward(gate, up)
    dgate, dup = swiglu_backward(grad_output, cache)
    return {"output": y, "grad_gate": dgate, "grad_up": dup}


def cross_entropy(logits, labels, grad_output):
    loss, cache = cross_entropy_forward(logits, labels)
    return {"output": np.array(loss, dtype=np.float64),
            "grad_logits": cross_entropy_backward(float(grad_output), cache)}


def quantize_4bit(weight, blocksize, quant_type):
    packed, absmax = quantize_4bit_reference(weight, int(blocksize), quant_type)
    return {"packed": packed, "absmax": absmax}


def dequantize_4bit(packed, absmax, blocksize, quant_type, shape):
    n = int(np.prod(shape))
    return {"weight": dequantize_4bit_reference(packed, absmax, int(blocksize), quant_type, n).reshape(shape)}


def adalora_budget(step, init_budget, target_budget, tinit, tfinal, total_step):
    budget, _ = budget_schedule(step, init_budget, target_budget, tinit, tfinal, total_step, deltaT=1)
    return {"budget": np.array(budget, dtype=np.int64)}
