"""A conformance target backed by the libraries' own layers: PEFT, bitsandbytes and transformers.

Run it with ``spectral-peft conformance spectral_peft.conformance.targets.peft_bnb``. Each function
builds the library's module (or calls its function) with the given weights copied in, runs its
forward on torch tensors of the input dtype and takes the gradients from autograd. Nothing from
spectral_peft is imported: the report measures the libraries, not the engine against itself.

What backs each function (versions read against: PEFT 0.21, bitsandbytes 0.50, transformers 5):
- lora:    ``peft.tuners.lora.layer.Linear`` over a ``torch.nn.Linear`` (LoraConfig r, no dropout),
           its ``scaling`` entry set to the given value.
- dora:    the same with ``use_dora=True``; ``lora_magnitude_vector`` set to the given magnitude.
           PEFT's DoRA (``DoraLinearLayer.forward``, eval path): base(x) + (m/n − 1)·(base(x) − b)
           + (m/n)·scaling·lora_B(lora_A(x)), n = ||W + scaling·B A|| per row, detached.
- adalora: ``peft.tuners.adalora.layer.SVDLinear``; lora_A, lora_E, lora_B, ``ranknum`` (a
           parameter, so ranknum + 1e-5 is rounded in the input dtype) and ``scaling`` set.
- rmsnorm: transformers' ``LlamaRMSNorm``. It computes mean(x²) and the scaling in float32 for
           every input dtype, so at float64 its error is float32's (about 1e-7 relative): a real
           deviation of the library from a float64 reference, kept, and shown by the report
           (measured against torch_autograd on a unit-normal case: ~2e-7 output, ~5e-7 grad_x).
- rope:    transformers' ``LlamaRotaryEmbedding`` (its ``inv_freq`` replaced by the given one) and
           ``apply_rotary_pos_emb``. cos and sin are computed in float32 whatever the input dtype,
           so at float64 the error is again float32's: the same honest deviation.
- quantize_4bit / dequantize_4bit: ``bitsandbytes.functional.quantize_4bit`` /
           ``dequantize_4bit`` on CPU (compress_statistics=False). bitsandbytes' packed is
           (ceil(n/2), 1); dequantisation is given a QuantState of ``shape`` (absmax float32, the
           codebook from ``get_4bit_type``), as bitsandbytes' Params4bit builds it.
           Defined only when bitsandbytes imports. Its CPU path works (0.50, no GPU) and agrees
           bit for bit with the conventions torch_autograd restates; on import it logs that it
           could not load the optional "kernels-community" CPU gemm kernel, which concerns the
           4-bit matmul only, not quantisation.
- adalora_budget: PEFT's ``RankAllocator.budget_schedule``. The allocator is made without its
           __init__ (which needs a model to count the budget from): init_bgt, target_bgt and a
           config holding tinit, tfinal, total_step, deltaT are set directly, which is all
           budget_schedule reads.

Not defined (no PEFT, bitsandbytes or transformers layer computes them on their own, so the suite
lists them as not run): attention, swiglu, cross_entropy, rosa.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from peft import AdaLoraConfig, LoraConfig
from peft.tuners.adalora.layer import RankAllocator, SVDLinear
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from .torch_autograd import _np, _t  # the NumPy <-> torch edges, shared by the two targets

try:
    import bitsandbytes.functional as bnb_functional
except ImportError:  # bitsandbytes not installed: quantize_4bit / dequantize_4bit are not defined
    bnb_functional = None

ADAPTER = "default"


def _base_linear(weight, bias):
    """torch.nn.Linear (d_out, d_in) of the weight's dtype with W and b copied in."""
    d_out, d_in = weight.shape
    base = torch.nn.Linear(d_in, d_out, bias=bias is not None, dtype=_t(weight).dtype)
    with torch.no_grad():
        base.weight.copy_(_t(weight))
        if bias is not None:
            base.bias.copy_(_t(bias))
    base.weight.requires_grad_(False)
    return base


def _lora_layer(weight, bias, lora_A, lora_B, scaling, use_dora, lora_magnitude=None):
    """PEFT's lora Linear with A, B (and DoRA's magnitude) copied in and ``scaling`` set."""
    r = lora_A.shape[0]
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, use_dora=use_dora)
    layer = LoraLinear(_base_linear(weight, bias), ADAPTER, config=config, r=r, lora_alpha=r)
    layer.to(_t(weight).dtype)
    with torch.no_grad():
        layer.lora_A[ADAPTER].weight.copy_(_t(lora_A))
        layer.lora_B[ADAPTER].weight.copy_(_t(lora_B))
        if use_dora:
            layer.lora_magnitude_vector[ADAPTER].weight.copy_(_t(lora_magnitude))
    layer.scaling[ADAPTER] = scaling
    layer.eval()
    return layer


def lora(*, x, weight, bias, lora_A, lora_B, scaling, grad_output):
    """PEFT LoRA Linear: output = x Wᵀ + b + scaling·(x Aᵀ) Bᵀ, gradients by autograd."""
    dt = x.dtype
    layer = _lora_layer(weight, bias, lora_A, lora_B, scaling, use_dora=False)
    X = _t(x, True)
    y = layer(X)
    y.backward(_t(grad_output))
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt),
            "grad_lora_A": _np(layer.lora_A[ADAPTER].weight.grad, dt),
            "grad_lora_B": _np(layer.lora_B[ADAPTER].weight.grad, dt)}


def dora(*, x, weight, bias, lora_A, lora_B, lora_magnitude, scaling, grad_output):
    """PEFT DoRA Linear (use_dora=True), module docstring."""
    dt = x.dtype
    layer = _lora_layer(weight, bias, lora_A, lora_B, scaling, use_dora=True, lora_magnitude=lora_magnitude)
    X = _t(x, True)
    y = layer(X)
    y.backward(_t(grad_output))
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt),
            "grad_lora_A": _np(layer.lora_A[ADAPTER].weight.grad, dt),
            "grad_lora_B": _np(layer.lora_B[ADAPTER].weight.grad, dt),
            "grad_lora_magnitude": _np(layer.lora_magnitude_vector[ADAPTER].weight.grad, dt)}


def adalora(*, x, weight, bias, lora_A, lora_E, lora_B, scaling, ranknum, grad_output):
    """PEFT AdaLoRA SVDLinear: x Wᵀ + b + (x (A⊙E)ᵀ Bᵀ)·scaling/(ranknum + 1e-5)."""
    dt = x.dtype
    r = lora_A.shape[0]
    config = AdaLoraConfig(init_r=r, target_r=r, lora_alpha=r, lora_dropout=0.0, total_step=10, init_lora_weights=False)
    layer = SVDLinear(_base_linear(weight, bias), ADAPTER, config=config, r=r, lora_alpha=r)
    layer.to(_t(weight).dtype)
    with torch.no_grad():
        layer.lora_A[ADAPTER].copy_(_t(lora_A))
        layer.lora_E[ADAPTER].copy_(_t(lora_E))
        layer.lora_B[ADAPTER].copy_(_t(lora_B))
        layer.ranknum[ADAPTER].fill_(ranknum)
    layer.scaling[ADAPTER] = scaling
    layer.eval()
    X = _t(x, True)
    y = layer(X)
    y.backward(_t(grad_output))
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt),
            "grad_lora_A": _np(layer.lora_A[ADAPTER].grad, dt), "grad_lora_E": _np(layer.lora_E[ADAPTER].grad, dt),
            "grad_lora_B": _np(layer.lora_B[ADAPTER].grad, dt)}


def rmsnorm(*, x, weight, eps, grad_output):
    """transformers' LlamaRMSNorm (float32 inside, module docstring)."""
    dt = x.dtype
    norm = LlamaRMSNorm(weight.shape[0], eps=eps).to(_t(weight).dtype)
    with torch.no_grad():
        norm.weight.copy_(_t(weight))
    X = _t(x, True)
    y = norm(X)
    y.backward(_t(grad_output).to(y.dtype))
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt), "grad_weight": _np(norm.weight.grad, dt)}


def rope(*, x, position_ids, inv_freq, grad_output):
    """transformers' LlamaRotaryEmbedding (cos, sin in float32) and apply_rotary_pos_emb."""
    dt = x.dtype
    D = x.shape[-1]
    config = LlamaConfig(hidden_size=D, num_attention_heads=1, head_dim=D,
                         max_position_embeddings=max(2, int(np.max(position_ids)) + 1))
    rotary = LlamaRotaryEmbedding(config)
    rotary.inv_freq = _t(inv_freq).to(torch.float32)
    X = _t(x, True)
    cos, sin = rotary(X, torch.from_numpy(np.asarray(position_ids, dtype=np.int64).copy()))  # (B, T, D)
    y, _ = apply_rotary_pos_emb(X, X.detach(), cos, sin)
    y.backward(_t(grad_output))
    return {"output": _np(y, dt), "grad_x": _np(X.grad, dt)}


if bnb_functional is not None:

    def quantize_4bit(*, weight, blocksize, quant_type):
        """bitsandbytes.functional.quantize_4bit on CPU: packed (ceil(n/2), 1) uint8, absmax float32."""
        packed, state = bnb_functional.quantize_4bit(_t(np.asarray(weight, dtype=np.float32)), blocksize=blocksize,
                                                     quant_type=quant_type, compress_statistics=False)
        return {"packed": packed.numpy().copy(), "absmax": state.absmax.numpy().astype(np.float32)}

    def dequantize_4bit(*, packed, absmax, blocksize, quant_type, shape):
        """bitsandbytes.functional.dequantize_4bit on CPU, reshaped to ``shape`` float32."""
        state = bnb_functional.QuantState(absmax=_t(np.asarray(absmax, dtype=np.float32)),
                                          shape=torch.Size(tuple(shape)), code=bnb_functional.get_4bit_type(quant_type, device="cpu"),
                                          blocksize=blocksize, quant_type=quant_type, dtype=torch.float32)
        out = bnb_functional.dequantize_4bit(_t(np.asarray(packed, dtype=np.uint8)), quant_state=state)
        return {"weight": out.numpy().astype(np.float32).reshape(tuple(shape))}


def adalora_budget(*, step, init_budget, target_budget, tinit, tfinal, total_step):
    """PEFT's RankAllocator.budget_schedule(step)[0] (the allocator made as the module docstring says)."""
    allocator = RankAllocator.__new__(RankAllocator)
    allocator.peft_config = SimpleNamespace(tinit=tinit, tfinal=tfinal, total_step=total_step, deltaT=1)
    allocator.init_bgt, allocator.target_bgt = init_budget, target_budget
    budget, _ = allocator.budget_schedule(step)
    return {"budget": np.array(int(budget))}
