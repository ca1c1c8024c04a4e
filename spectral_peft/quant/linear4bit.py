"""Linear4bit: a frozen linear whose weight lives only in 4-bit form (QLoRA's base layer).

Shape legend: x (..., d_in); W (d_out, d_in), stored as packed (ceil(d_out·d_in/2), 1) uint8
codes of its row-major flattening plus a QuantState; b (d_out,); y (..., d_out).

    forward:   W = dequantize_4bit(packed, state)  (float32, cast to the compute dtype)
               y = x Wᵀ + b
    backward:  dX = dY W, with W dequantised again (never kept between the two passes);
               db = Σ_N dY when the bias is trainable. The base weight gets no gradient.

No lasting full-precision copy exists: ``params`` holds only the bias, and the dequantised W
is a temporary of each pass. Adapters (LoRA, DoRA, AdaLoRA, RoSA) wrap this layer exactly as they
wrap a dense Linear, through forward / backward / effective_weight: that is QLoRA and QRoSA.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_xp
from ..module import Linear, Module, match_target_modules
from .blockwise import (BLOCKSIZES_4BIT, QuantState, _as_float32_flat, _check_blocksize, _check_match,
                        _check_quant_type, dequantize_4bit, quantize_4bit)


class Linear4bit(Linear):
    """y = x Wᵀ + b with W stored as 4-bit NF4/FP4 codes (see the module docstring).

    Build it with :meth:`from_linear` (quantise a dense Linear) or from ``packed`` and ``state``
    directly. ``compute_dtype`` is the dtype of inputs, outputs and the dequantised W.
    """

    def __init__(self, packed, state: QuantState, bias=None, compute_dtype="float32"):
        Module.__init__(self)  # not Linear.__init__: there is no dense weight to register
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D (d_out, d_in) weight state, got shape {state.shape}")
        compute_dtype = np.dtype(compute_dtype)
        if compute_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"compute_dtype must be float32 or float64, got {compute_dtype}")
        if bias is not None and bias.shape != (state.shape[0],):
            raise ValueError(f"Linear4bit bias must have shape ({state.shape[0]},), got {bias.shape}")
        self.packed = packed  # (ceil(n/2), 1) uint8
        self.quant_state = state
        self.compute_dtype = compute_dtype
        if bias is not None:
            self.params["bias"] = bias.astype(compute_dtype, copy=False)

    @classmethod
    def from_linear(cls, linear: Linear, quant_type: str = "nf4", blocksize: int = 64,
                    compress_statistics: bool = True, match: str = "nearest") -> Linear4bit:
        """Quantise a dense Linear's weight; the bias is kept as it is (and frozen if it was).
        ``match`` is quantize_4bit's double-quantisation rule ("nearest" or "bitsandbytes")."""
        W = linear.effective_weight()
        packed, state = quantize_4bit(W, blocksize=blocksize, quant_type=quant_type,
                                      compress_statistics=compress_statistics, match=match)
        layer = cls(packed, state, linear.params.get("bias"), compute_dtype=W.dtype)
        layer.frozen = {k for k in linear.frozen if k in layer.params}
        return layer

    # --- the Linear interface, answered without dequantising -------------------------------------
    @property
    def d_in(self) -> int:
        return self.quant_state.shape[1]

    @property
    def d_out(self) -> int:
        return self.quant_state.shape[0]

    @property
    def dtype(self):
        return self.compute_dtype

    @property
    def xp(self):
        return get_xp(self.packed)

    @property
    def quant_type(self) -> str:
        return self.quant_state.quant_type

    def effective_weight(self):
        """The dense (d_out, d_in) weight, dequantised now (a temporary, never stored)."""
        W = dequantize_4bit(self.packed, self.quant_state)  # (d_out, d_in) float32
        return W.astype(self.compute_dtype, copy=False)

    def weight_bytes(self) -> int:
        """Bytes of the frozen weight as stored: packed codes + block statistics."""
        return int(self.packed.nbytes) + self.quant_state.nbytes()

    def bits_per_parameter(self) -> float:
        return 8.0 * self.weight_bytes() / (self.d_out * self.d_in)

    # --- forward / backward ----------------------------------------------------------------------
    def forward(self, x):
        if x.shape[-1] != self.d_in:
            raise ValueError(f"Linear4bit expects inputs (..., {self.d_in}), got {x.shape}")
        W = self.effective_weight()  # (d_out, d_in), dropped at the end of this call
        y = x @ W.T  # (..., d_in) @ (d_in, d_out) -> (..., d_out)
        if "bias" in self.params:
            y += self.params["bias"]
        self.cache = ("bias" in self.params,)  # nothing but a flag: dX needs only W
        return y

    def backward(self, dy):
        (has_bias,) = self.cache
        if has_bias and "bias" not in self.frozen:
            # y = ... + b  =>  db = Σ_N dY
            self.accumulate("bias", dy.reshape(-1, dy.shape[-1]).sum(axis=0))
        W = self.effective_weight()  # dequantised again: no copy survives the forward
        # y = x Wᵀ  =>  dX = dY W     (..., d_out) @ (d_out, d_in) -> (..., d_in)
        dx = dy @ W
        self.cache = None
        return dx


def quantize_model(model: Module, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True,
                   target_modules=None, match: str = "nearest") -> list[str]:
    """Replace dense Linears of ``model`` by Linear4bit, in place; returns the replaced paths.

    ``target_modules`` follows PEFT's rule (module.match_target_modules); None means every
    dense Linear (a model's embeddings and tied head are not Linears, so they stay dense). Call it
    before wrapping with adapters, or after: an adapter's ``base_layer`` is a Linear like any other.
    Everything is checked and quantised before anything is installed, so an error (a bad
    argument, a NaN weight) leaves the model untouched. ``match`` is quantize_4bit's
    double-quantisation rule: "nearest" (default) or "bitsandbytes" (its CPU kernel bit for bit).
    """
    _check_quant_type(quant_type)
    _check_match(match)
    _check_blocksize(blocksize, BLOCKSIZES_4BIT)
    if not isinstance(compress_statistics, bool):
        raise TypeError(f"compress_statistics must be a bool, got {compress_statistics!r}")
    if target_modules is None:
        paths = [p for p, m in model.named_modules() if isinstance(m, Linear) and not isinstance(m, Linear4bit)]
    else:
        paths = [p for p in match_target_modules(model, target_modules)
                 if not isinstance(model.get_submodule(p), Linear4bit)]
    if not paths:
        raise ValueError("quantize_model found no dense Linear to quantise"
                         + ("" if target_modules is None else f" among target_modules={target_modules!r}"))
    for p in paths:  # every weight checked first (dtype, finiteness) so nothing is half-replaced
        try:
            _as_float32_flat(model.get_submodule(p).effective_weight(), name=f"{p}.weight")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"quantize_model: {exc}") from None
    new = {p: Linear4bit.from_linear(model.get_submodule(p), quant_type, blocksize, compress_statistics, match)
           for p in paths}
    for p, layer in new.items():
        model.set_submodule(p, layer)
    return paths


def frozen_weight_bytes(model: Module) -> int:
    """Bytes of every frozen base weight: the stored form for a layer that keeps its weight outside
    ``params`` and says so by ``weight_bytes()`` (Linear4bit's packed codes, a pruned base's sparse
    storage: spectral_peft.prune), the array size for every other frozen parameter (embeddings,
    norms, dense frozen linears)."""
    total = 0
    seen: set[int] = set()
    for _, m in model.named_modules():
        if callable(getattr(m, "weight_bytes", None)):
            total += m.weight_bytes()
        for k, v in m.params.items():
            if k in m.frozen and id(v) not in seen:
                seen.add(id(v))
                total += int(v.nbytes)
    return total


__all__ = ["Linear4bit", "quantize_model", "frozen_weight_bytes"]
