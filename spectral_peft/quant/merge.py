"""Merging a LoRA into a 4-bit base: the three ways, and what each costs (docs/qlora.md).

Shape legend: W (d_out, d_in); Q the 4-bit codes and block statistics of the frozen base;
W_q = dequantize(Q), the base the QLoRA model actually trained against; Δ = s·B A the adapter's
delta, B (d_out, r), A (r, d_in). The merged weight that computes exactly what the adapted model
computes is

    W* = W_q + Δ                                                    (float64)

1. ``merge_requantize``: Q' = quantize(W_q + Δ), a Linear4bit again. What PEFT's merge does on a
   bitsandbytes Linear4bit. Costs nothing in memory (4 bits per weight stay 4 bits); costs
   accuracy: each element moves to the nearest code of its (new) block scale, so wherever |Δ| is
   below half the gap between neighbouring codes the element returns to its old code and the
   delta is erased, and elsewhere it lands on a code, not on W_q + Δ. The block maxima change too.
2. ``merge_float``: W_f = W_q + Δ in the compute dtype, a dense Linear. Exact up to one rounding;
   costs the memory of a dense base (32 or 64 bits per weight instead of ~4.1).
3. Keep the adapter unmerged (the layer as it is): exact; costs r·(d_in + d_out) extra
   multiply-adds per token per layer, and the adapter's parameters.

``merge_error`` measures a merged weight against W*; ``merge_lora_4bit`` applies one of the
three to every LoRA layer over a Linear4bit base of a model.
"""
from __future__ import annotations

import numpy as np

from ..adapters.base import adapter_layers
from ..backend import to_host
from ..module import Linear
from .blockwise import dequantize_absmax, quantize_4bit, unpack_4bit
from .codebooks import sorted_4bit_code
from .linear4bit import Linear4bit

HOWS = ("requantize", "float", "unmerged")


def _parts(layer):
    """(the Linear4bit base, Δ = s·B A (d_out, d_in) float64 host) of a LoRA layer over a 4-bit base."""
    base = getattr(layer, "base_layer", None)
    if not isinstance(base, Linear4bit):
        raise TypeError(f"merging into a 4-bit base needs a LoRA layer over a Linear4bit, got "
                        f"{type(layer).__name__} over {type(base).__name__}")
    if not hasattr(layer, "delta_weight") or getattr(layer, "merged", False):
        raise TypeError(f"{type(layer).__name__}: needs an unmerged adapter layer with delta_weight()")
    return base, np.asarray(to_host(layer.delta_weight()), dtype=np.float64)


def exact_merged_weight(layer) -> np.ndarray:
    """W* = W_q + Δ (d_out, d_in) float64 host: what the adapted layer computes."""
    base, delta = _parts(layer)
    return np.asarray(to_host(base.effective_weight()), dtype=np.float64) + delta


def merge_requantize(layer) -> Linear4bit:
    """Q' = quantize(W_q + Δ) with the base's quant_type, blocksize and double quantisation: a new
    Linear4bit (PEFT's merge into a bitsandbytes 4-bit layer). 4-bit memory; loses the part of Δ
    below half a quantisation step (module docstring)."""
    base, _ = _parts(layer)
    st = base.quant_state
    W = exact_merged_weight(layer).astype(np.float32)  # bitsandbytes quantises the float32 sum
    packed, state = quantize_4bit(W, blocksize=st.blocksize, quant_type=st.quant_type,
                                  compress_statistics=st.nested)
    xp = base.xp
    bias = base.params.get("bias")
    merged = Linear4bit(xp.asarray(packed), state, bias, compute_dtype=base.compute_dtype)
    merged.frozen = set(merged.params)
    return merged


def merge_float(layer) -> Linear:
    """W_f = W_q + Δ as a dense Linear in the base's compute dtype: exact to one rounding, at the
    memory of a dense base."""
    base, _ = _parts(layer)
    xp = base.xp
    W = xp.asarray(exact_merged_weight(layer).astype(base.compute_dtype))
    bias = base.params.get("bias")
    merged = Linear(W, None if bias is None else bias.copy())
    merged.frozen = set(merged.params)
    return merged


def merge_error(layer, merged) -> dict:
    """How far ``merged`` (a Linear or Linear4bit) is from W* = W_q + Δ:

    max_abs, rel_fro = ||W' − W*||_F / ||Δ||_F (the error as a fraction of the delta itself),
    delta_kept = <W' − W_q, Δ> / ||Δ||² (1: the delta survived, 0: erased), and for a 4-bit
    result the fraction of elements whose code did not change (``codes_unchanged``) and the
    fraction with |Δ| below half the gap between their base code and its neighbours
    (``below_half_step``): the elements where requantisation must erase Δ."""
    base, delta = _parts(layer)
    Wq = np.asarray(to_host(base.effective_weight()), dtype=np.float64)
    Wm = np.asarray(to_host(merged.effective_weight()), dtype=np.float64)
    err = Wm - (Wq + delta)
    dd = float(np.sum(delta * delta))
    out = {"max_abs": float(np.max(np.abs(err))),
           "rel_fro": float(np.sqrt(np.sum(err * err) / dd)) if dd > 0 else 0.0,
           "delta_kept": float(np.sum((Wm - Wq) * delta) / dd) if dd > 0 else 1.0}
    if isinstance(merged, Linear4bit):
        codes0 = _codes(base)
        out["codes_unchanged"] = float(np.mean(codes0 == _codes(merged)))
        out["below_half_step"] = float(np.mean(np.abs(delta).reshape(-1) < half_steps(base)))
    return out


def _codes(layer: Linear4bit) -> np.ndarray:
    """The 4-bit code of every element (n,) of a Linear4bit, row-major."""
    n = layer.d_out * layer.d_in
    return to_host(unpack_4bit(layer.packed, n))


def half_steps(layer: Linear4bit) -> np.ndarray:
    """(n,) float64: half the distance from each element's dequantised value to the nearer of its
    code's neighbours, times the block's scale: a change smaller than this cannot reach another
    code (with the block scale unchanged)."""
    st = layer.quant_state
    values, order, _ = sorted_4bit_code(st.quant_type)
    v = values.astype(np.float64)
    gap_lo = np.r_[np.inf, np.diff(v)]  # to the next lower code
    gap_hi = np.r_[np.diff(v), np.inf]  # to the next higher code
    rank = np.empty(16, dtype=np.int64)
    rank[order] = np.arange(16)  # code -> sorted position
    pos = rank[_codes(layer)]
    absmax = np.asarray(to_host(dequantize_absmax(st)), dtype=np.float64)  # (nb,) block scales
    scale = absmax[np.arange(pos.size) // st.blocksize]
    return 0.5 * np.minimum(gap_lo[pos], gap_hi[pos]) * scale


def merge_lora_4bit(peft_model, how: str):
    """Merge every LoRA layer over a Linear4bit base of ``peft_model`` ``how`` ("requantize",
    "float") and return the plain model; "unmerged" returns ``peft_model`` unchanged. Every layer
    is checked before any is replaced. The PeftModel is not usable afterwards (as merge_and_unload)."""
    if how not in HOWS:
        raise ValueError(f"how must be one of {HOWS}, got {how!r}")
    if how == "unmerged":
        return peft_model
    model = peft_model.model if hasattr(peft_model, "peft_config") else peft_model
    layers = adapter_layers(model)
    for _, layer in layers:
        _parts(layer)  # raises before anything changes
    make = merge_requantize if how == "requantize" else merge_float
    for path, layer in layers:
        model.set_submodule(path, make(layer))
    return model
