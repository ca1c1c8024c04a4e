"""Merging an adapter into a pruned base: keep the sparsity (the delta masked to the support), or
densify. ``AdapterLayer.merge`` refuses a pruned base (its weight is not a dense array to add
into); these functions are the two explicit choices (docs/pruning.md).

Shape legend: W (d_out, d_in) the pruned base weight, P its boolean support; Δ (d_out, d_in) the
adapter's dense delta (LoRA: s·B A, dense in general).

- ``keep_sparsity=True``:  W' = W + P ⊙ Δ, stored as the base was (same CSR support or the same
  N:M positions, so the same bytes). It is NOT what the adapted model computed: the part (1−P) ⊙ Δ
  is dropped; :func:`off_support_fraction` says how much (||(1−P) ⊙ Δ||_F / ||Δ||_F).
- ``keep_sparsity=False``: W' = W + Δ, a dense Linear: exact up to one rounding, at dense bytes.
"""
from __future__ import annotations

import numpy as np

from ..adapters.base import adapter_layers
from ..backend import to_host
from ..module import Linear
from .layers import PRUNED_TYPES, NMSparseLinear, SparseLinear


def _parts(layer):
    base = getattr(layer, "base_layer", None)
    if not isinstance(base, PRUNED_TYPES):
        raise TypeError(f"merging into a pruned base needs an adapter layer over a SparseLinear or NMSparseLinear, "
                        f"got {type(layer).__name__} over {type(base).__name__}")
    if getattr(layer, "merged", False) or not hasattr(layer, "delta_weight"):
        raise TypeError(f"{type(layer).__name__}: needs an unmerged adapter layer with delta_weight()")
    return base, layer.delta_weight()


def off_support_fraction(layer) -> float:
    """||(1−P) ⊙ Δ||_F / ||Δ||_F: the share of the delta a sparsity-keeping merge drops (0 for Δ = 0)."""
    base, delta = _parts(layer)
    d = np.asarray(to_host(delta), dtype=np.float64)
    P = to_host(base.mask())
    total = float(np.linalg.norm(d))
    return float(np.linalg.norm(np.where(P, 0.0, d))) / total if total > 0 else 0.0


def merge_pruned(layer, keep_sparsity: bool = True):
    """The merged base of one adapter layer over a pruned base (module docstring): a pruned layer
    of the same type and support (``keep_sparsity``), or a dense Linear."""
    if not isinstance(keep_sparsity, bool):
        raise TypeError(f"keep_sparsity must be True (mask the delta to the support) or False (densify), "
                        f"got {keep_sparsity!r}")
    base, delta = _parts(layer)
    bias = base.params.get("bias")
    if not keep_sparsity:
        merged = Linear(base.effective_weight() + delta.astype(base.dtype, copy=False), bias)
    elif isinstance(base, SparseLinear):
        c = base.csr
        merged = SparseLinear(c.with_values(c.values + delta[c.rows, c.indices].astype(c.values.dtype)), bias,
                              base.compute)
    else:
        rows, cols = base._index()
        merged = NMSparseLinear(base.values + delta[rows, cols].astype(base.dtype), base.positions, base.n, base.m,
                                base.d_in, bias)
    merged.frozen = set(base.frozen)
    return merged


def merge_and_unload_pruned(peft_model, keep_sparsity: bool = True):
    """Replace every adapter layer over a pruned base by :func:`merge_pruned` of it; returns the plain
    model. Every layer is checked (and merged) before any is installed."""
    model = getattr(peft_model, "model", peft_model)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("merge_and_unload_pruned: the model holds no adapter layer")
    merged = {path: merge_pruned(layer, keep_sparsity) for path, layer in layers}
    for path, new in merged.items():
        model.set_submodule(path, new)
    return model


__all__ = ["merge_and_unload_pruned", "merge_pruned", "off_support_fraction"]
