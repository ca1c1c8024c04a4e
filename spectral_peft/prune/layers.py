"""The pruned frozen base: a Linear whose weight is stored sparse (CSR or N:M packed), the
calibration pass that Wanda's scores need, and :func:`prune_model`.

Shape legend: x (..., d_in); W (d_out, d_in) the pruned weight, zero off its support; b (d_out,);
y (..., d_out); nnz kept entries; K = d_in·N/M kept entries per row of an N:M layer.

    forward:   y = x Wᵀ + b
    backward:  dX = dY W   (the base weight is frozen: no dW; db = Σ_N dY if the bias trains)

Two storages (``weight_bytes()`` counts exactly what is stored; ``quant.frozen_weight_bytes`` adds
it to the model's frozen bytes):

- :class:`SparseLinear` (unstructured: magnitude, Wanda): CSR (spectral_peft.sparse.CSR), values
  (nnz,) in the weight's dtype + indptr (d_out+1,) int32 + column indices (nnz,) int32. The products
  are the sparse kernels RoSA uses: y = spmm(S, x) = x Sᵀ, dX = spmm_t(S, dY) = dY S. With float32
  values and int32 indices CSR costs 8 bytes per KEPT weight, so it is smaller than the dense
  4 bytes per weight only above 50% sparsity (exactly the same size at 50%, plus indptr).
- :class:`NMSparseLinear` (N:M): values (d_out, K) and positions (d_out, K) uint8 in [0, M), the
  place of each kept weight inside its group of M (ascending). 2:4 float32: 2.5 bytes per weight
  (0.625 of dense). The CPU has no N:M kernel, so each pass scatters W back to a dense temporary
  and runs one GEMM (as Linear4bit dequantises); the products are ops.linear's.

Both are :class:`~spectral_peft.module.Linear` subclasses answering ``effective_weight()`` (the
dense W, a temporary), so adapters wrap them as they wrap any Linear, and ``quantize_model`` turns
one into a Linear4bit of its pruned weight (prune, then quantise: QLoRA on a pruned base; the
NF4 and FP4 codebooks hold an exact 0, so pruned entries dequantise to exactly 0 and the support
survives, but the 4-bit codes cover every position: docs/pruning.md).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_xp, to_host, to_xp
from ..module import Linear, Module, match_target_modules
from ..ops.linear import linear_backward, linear_forward
from ..sparse import CSR, spmm, spmm_t
from ..train import batch_on_backend
from .masks import SCORES, check_nm, check_sparsity, make_mask


class SparseLinear(Linear):
    """y = x Wᵀ + b with the pruned W stored in CSR (see the module docstring).

    ``compute``: "spmm" (default) runs the sparse products; "dense" scatters W to a dense temporary
    for each pass and runs one GEMM (the same numbers up to summation order; faster on a CPU below
    ~90% sparsity, benchmarks/prune.py; the storage is CSR either way).
    """

    COMPUTES = ("spmm", "dense")

    def __init__(self, csr: CSR, bias=None, compute: str = "spmm"):
        Module.__init__(self)  # not Linear.__init__: there is no dense weight to register
        if bias is not None and bias.shape != (csr.shape[0],):
            raise ValueError(f"SparseLinear bias must have shape ({csr.shape[0]},), got {bias.shape}")
        if compute not in self.COMPUTES:
            raise ValueError(f"SparseLinear compute must be one of {', '.join(self.COMPUTES)}, got {compute!r}")
        self.csr = csr  # frozen: not in params (weight_bytes() counts it)
        self.compute = compute
        if bias is not None:
            self.params["bias"] = bias

    @classmethod
    def from_linear(cls, linear: Linear, keep, compute: str = "spmm") -> SparseLinear:
        """Prune ``linear``'s weight to the boolean (d_out, d_in) ``keep`` mask."""
        W = linear.effective_weight()
        if keep.shape != W.shape:
            raise ValueError(f"keep mask has shape {keep.shape}, the weight {W.shape}")
        csr = CSR.from_mask(keep, dtype=W.dtype)
        csr = csr.with_values(W[csr.rows, csr.indices])  # row-major values on the support
        layer = cls(csr, linear.params.get("bias"), compute)
        layer.frozen = {k for k in linear.frozen if k in layer.params}
        return layer

    @property
    def d_in(self) -> int:
        return self.csr.shape[1]

    @property
    def d_out(self) -> int:
        return self.csr.shape[0]

    @property
    def dtype(self):
        return self.csr.values.dtype

    @property
    def xp(self):
        return get_xp(self.csr.values)

    def effective_weight(self):
        """The dense (d_out, d_in) W, zero off the support (a temporary)."""
        return self.csr.to_dense()

    def mask(self):
        """Boolean (d_out, d_in) support."""
        return self.csr.mask()

    def weight_bytes(self) -> int:
        """Bytes stored: values + indptr + column indices."""
        c = self.csr
        return int(c.values.nbytes + c.indptr.nbytes + c.indices.nbytes)

    def forward(self, x):
        if x.shape[-1] != self.d_in:
            raise ValueError(f"SparseLinear expects inputs (..., {self.d_in}), got {x.shape}")
        if self.compute == "dense":
            y, self.cache = linear_forward(x, self.effective_weight(), self.params.get("bias"), keep_x=False)
            return y
        y = spmm(self.csr, x)  # y = x Wᵀ   (..., d_in) -> (..., d_out)
        if "bias" in self.params:
            y += self.params["bias"]
        self.cache = (None, "bias" in self.params)  # linear_forward's cache layout: dX needs only W
        return y

    def backward(self, dy):
        if self.compute == "dense":
            # y = x Wᵀ + b  =>  dX = dY W (W scattered again), db = Σ_N dY
            dx, _, db = linear_backward(dy, self.cache, self.effective_weight(), need_dW=False)
        else:
            _, has_bias = self.cache
            # y = ... + b  =>  db = Σ_N dY
            db = dy.reshape(-1, dy.shape[-1]).sum(axis=0) if has_bias else None
            # y = x Wᵀ  =>  dX = dY W     (..., d_out) -> (..., d_in)
            dx = spmm_t(self.csr, dy)
        if db is not None and "bias" not in self.frozen:
            self.accumulate("bias", db)
        self.cache = None
        return dx


class NMSparseLinear(Linear):
    """y = x Wᵀ + b with W N:M-sparse, stored packed: values (d_out, K), positions (d_out, K)."""

    def __init__(self, values, positions, n: int, m: int, d_in: int, bias=None):
        Module.__init__(self)
        check_nm(n, m, d_in)
        K = d_in * n // m
        if values.ndim != 2 or values.shape[1] != K or positions.shape != values.shape:
            raise ValueError(f"N:M {n}:{m} with d_in={d_in} needs values and positions of shape (d_out, {K}), got "
                             f"{values.shape} and {positions.shape}")
        if bias is not None and bias.shape != (values.shape[0],):
            raise ValueError(f"NMSparseLinear bias must have shape ({values.shape[0]},), got {bias.shape}")
        self.values, self.positions = values, positions.astype(np.uint8, copy=False)
        self.n, self.m, self._d_in = n, m, d_in
        if bias is not None:
            self.params["bias"] = bias

    @classmethod
    def from_linear(cls, linear: Linear, keep, n: int, m: int) -> NMSparseLinear:
        """Pack ``linear``'s weight on an N:M ``keep`` mask (exactly n kept in every group of m)."""
        W = linear.effective_weight()
        xp = get_xp(W)
        d_out, d_in = W.shape
        check_nm(n, m, d_in)
        g = keep.reshape(d_out, d_in // m, m)
        if not bool((g.sum(axis=2) == n).all()):
            raise ValueError(f"keep mask is not {n}:{m}: some group of {m} keeps another count than {n}")
        # the kept positions of each group, ascending: a stable argsort of ~keep puts them first
        pos = xp.argsort(~g, axis=2, kind="stable")[:, :, :n]  # (d_out, G, n)
        vals = xp.take_along_axis(W.reshape(d_out, d_in // m, m), pos, axis=2)
        layer = cls(vals.reshape(d_out, -1), pos.reshape(d_out, -1).astype(np.uint8), n, m, d_in,
                    linear.params.get("bias"))
        layer.frozen = {k for k in linear.frozen if k in layer.params}
        return layer

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def d_out(self) -> int:
        return self.values.shape[0]

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def xp(self):
        return get_xp(self.values)

    def _index(self):
        """(rows, columns) of every stored value, each (d_out, K)."""
        xp = self.xp
        K = self.values.shape[1]
        group = xp.arange(K) // self.n  # (K,) the group of each stored slot
        cols = group[None, :] * self.m + self.positions.astype(np.int64)
        return xp.arange(self.d_out)[:, None], cols

    def effective_weight(self):
        """The dense (d_out, d_in) W, zero off the support (a temporary)."""
        W = self.xp.zeros((self.d_out, self.d_in), dtype=self.values.dtype)
        W[self._index()] = self.values
        return W

    def mask(self):
        keep = self.xp.zeros((self.d_out, self.d_in), dtype=bool)
        keep[self._index()] = True
        return keep

    def weight_bytes(self) -> int:
        """Bytes stored: values + uint8 positions."""
        return int(self.values.nbytes + self.positions.nbytes)

    def forward(self, x):
        if x.shape[-1] != self.d_in:
            raise ValueError(f"NMSparseLinear expects inputs (..., {self.d_in}), got {x.shape}")
        y, self.cache = linear_forward(x, self.effective_weight(), self.params.get("bias"), keep_x=False)
        return y

    def backward(self, dy):
        # y = x Wᵀ + b  =>  dX = dY W (W scattered again), db = Σ_N dY
        dx, _, db = linear_backward(dy, self.cache, self.effective_weight(), need_dW=False)
        if db is not None and "bias" not in self.frozen:
            self.accumulate("bias", db)
        self.cache = None
        return dx


PRUNED_TYPES = (SparseLinear, NMSparseLinear)


# --- calibration ---------------------------------------------------------------------------------
class _NormRecorder(Module):
    """Stands in for a Linear during calibration: adds Σ_n x_nj² of its inputs, then calls it."""

    def __init__(self, inner: Linear):
        super().__init__()
        self.inner = inner
        self.sumsq = None  # (d_in,) float64, host
        self.tokens = 0

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        s = to_host((x2.astype(np.float64) ** 2).sum(axis=0))
        self.sumsq = s if self.sumsq is None else self.sumsq + s
        self.tokens += x2.shape[0]
        return self.inner.forward(x)


def activation_norms(model: Module, batches, target_modules=None) -> dict:
    """{path: a (d_in,) float64 host}: a_j = ||x[:, j]||₂ over every token of ``batches`` (batch
    dicts for ``model.forward(**batch)``) that reached each chosen Linear (default: every Linear).

    One pass of the dense model in eval mode (Wanda's own code feeds each block the outputs of the
    blocks already pruned; here every norm comes from the unpruned model). The model is restored."""
    paths = _linear_targets(model, target_modules)
    recorders = {p: _NormRecorder(model.get_submodule(p)) for p in paths}
    for p, r in recorders.items():
        model.set_submodule(p, r)
    was_training = model.training
    model.eval()
    try:
        backend = getattr(model, "backend", None)
        for batch in batches:
            model.forward(**batch_on_backend(batch, backend))
            if hasattr(model, "clear_cache"):
                model.clear_cache()
    finally:
        for p, r in recorders.items():
            model.set_submodule(p, r.inner)
        model.train(was_training)
    missing = [p for p, r in recorders.items() if r.sumsq is None]
    if missing:
        raise ValueError(f"activation_norms: no calibration token reached {missing}")
    return {p: np.sqrt(r.sumsq) for p, r in recorders.items()}


def _linear_targets(model: Module, target_modules) -> list[str]:
    """The dense Linears chosen (quantised or already pruned layers are not pruned again)."""
    if target_modules is None:
        return [p for p, m in model.named_modules() if type(m) is Linear]
    return [p for p in match_target_modules(model, target_modules) if type(model.get_submodule(p)) is Linear]


# --- pruning a model -----------------------------------------------------------------------------
def prune_linear(linear: Linear, score: str, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                 act_norm=None, compute: str = "spmm") -> Linear:
    """The pruned copy of one dense Linear: a SparseLinear (unstructured; ``compute`` its products)
    or NMSparseLinear (N:M)."""
    W = linear.effective_weight()
    a = None if act_norm is None else to_xp(np.asarray(act_norm), get_xp(W))
    keep = make_mask(W, score, sparsity, nm, a)
    if nm is not None:
        return NMSparseLinear.from_linear(linear, keep, *nm)
    return SparseLinear.from_linear(linear, keep, compute)


def prune_model(model: Module, score: str, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                norms: dict | None = None, target_modules=None, compute: str = "spmm") -> dict:
    """Replace the chosen dense Linears (``target_modules``, PEFT's rule; None: every dense Linear)
    by their pruned copies, in place. ``score`` "magnitude" or "wanda" (needs ``norms`` from
    :func:`activation_norms`); ``nm`` (N, M) for N:M, else ``sparsity`` in [0, 1); ``compute``
    SparseLinear's products ("spmm" or "dense"). Every layer is
    pruned before any is installed. Returns {path: {"zeros", "size", "sparsity", "weight_bytes",
    "dense_bytes"}}."""
    if nm is None:
        check_sparsity(sparsity)
    if score not in SCORES:
        raise ValueError(f"unknown pruning score {score!r}; choose from {', '.join(SCORES)}")
    paths = _linear_targets(model, target_modules)
    if not paths:
        raise ValueError("prune_model found no dense Linear to prune")
    if score == "wanda":
        missing = [p for p in paths if norms is None or p not in norms]
        if missing:
            raise ValueError(f"wanda pruning needs activation norms for {missing[:3]}; run activation_norms first")
    if compute not in SparseLinear.COMPUTES:
        raise ValueError(f"compute must be one of {', '.join(SparseLinear.COMPUTES)}, got {compute!r}")
    new = {p: prune_linear(model.get_submodule(p), score, sparsity, nm, None if norms is None else norms[p], compute)
           for p in paths}
    report = {}
    for p, layer in new.items():
        dense = model.get_submodule(p).effective_weight()
        model.set_submodule(p, layer)
        size = layer.d_out * layer.d_in
        zeros = size - int(to_host(layer.mask()).sum())
        report[p] = {"zeros": zeros, "size": size, "sparsity": zeros / size, "weight_bytes": layer.weight_bytes(),
                     "dense_bytes": int(dense.nbytes)}
    return report


__all__ = ["NMSparseLinear", "PRUNED_TYPES", "SparseLinear", "activation_norms", "prune_linear", "prune_model"]
