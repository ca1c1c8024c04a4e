"""DoRA: weight-decomposed LoRA, as PEFT defines it (``peft/tuners/lora/dora.py``, ``variants.py``).

Liu et al. 2024 (arXiv 2402.09353). Selected by ``LoraConfig(use_dora=True)``; the file format is
LoRA's plus ``lora_magnitude_vector`` (d_out,).

Shape legend: N tokens (any leading dims), d_in, d_out, r.

    A (r, d_in), B (d_out, r), m = lora_magnitude_vector (d_out,), s the LoRA scaling, W (d_out, d_in)
    n    = ||W + s·B A||₂ per output row (d_out,), from the current weights, DETACHED (paper §4.3:
           a constant in backward)
    g    = m / n (d_out,)
    x̃    = drop(x)
    y    = base(x) + (g − 1) ⊙ (x̃ Wᵀ) + g ⊙ s·(x̃ Aᵀ) Bᵀ        (the bias stays outside the rescaling)
    init: m = ||W + s·B A|| at creation (= ||W|| when B = 0, so y = base(x) exactly)
    merge: W' = g ⊙ (W + s·B A) (rows); unmerge: W = W' / g − s·B A with g from the merge time
    trainable parameters: r·(d_in + d_out) + d_out

Without dropout (or in eval) x̃ = x and x̃ Wᵀ is base(x) − b, so the forward needs no extra product
and y = b + g ⊙ v with v = x Wᵀ + s·(x Aᵀ)Bᵀ. Backward (n constant):
    dm = Σ_N dy ⊙ v / n                           v (N, d_out) is the one extra cached array
    dv = dy ⊙ g → the low-rank backward (dA, dB, its dx)
    dx = dy W + drop'(((g − 1) ⊙ dy) W + s·((g ⊙ dy) B) A)   [= (g ⊙ dy) W + ... without dropout]
"""
from __future__ import annotations

from dataclasses import dataclass

from ..backend import get_xp
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.lowrank import lowrank_backward, lowrank_forward
from .base import Recipe
from .lora import A_KEY, B_KEY, LoraConfig, LoraLinear

M_KEY = "lora_magnitude_vector"  # PEFT's file-key suffix (no ".weight")


def row_norms(W):
    """||W_i||₂ for each row i: (d_out, d_in) -> (d_out,), in W's dtype (torch.linalg.norm(dim=1))."""
    xp = get_xp(W)
    return xp.sqrt(xp.einsum("ij,ij->i", W, W))


class DoraLinear(LoraLinear):
    """LoRA with a learned magnitude and a detached direction norm (module docstring).

    Params: ``lora_A.weight`` (r, d_in), ``lora_B.weight`` (d_out, r), ``lora_magnitude_vector``
    (d_out,). Cache: the low-rank cache, the dropout mask, the norm n (d_out,) and v (N, d_out)
    when m is trainable.
    """

    def __init__(self, base, **kwargs):
        super().__init__(base, **kwargs)
        self.params[M_KEY] = self.weight_norm()  # m = ||W + s·B A|| at creation
        self._merge_norm = None

    def adapter_parameter_count(self) -> int:
        """r · (d_in + d_out) + d_out (docs/lora.md)."""
        return self.r * (self.d_in + self.d_out) + self.d_out

    def weight_norm(self):
        """n = ||W + s·B A|| per output row (d_out,), from the un-merged weights."""
        W = self.base_layer.effective_weight()
        if self.merged:
            raise RuntimeError("weight_norm needs the un-merged weight; unmerge() first")
        return row_norms(W + self.delta_weight())

    def effective_weight(self):
        """The dense (d_out, d_in) matrix this layer applies: g ⊙ (W + s·B A) per output row."""
        if self.merged:
            return self.base_layer.effective_weight()
        V = self.base_layer.effective_weight() + self.delta_weight()  # (d_out, d_in)
        return (self.params[M_KEY] / row_norms(V))[:, None] * V

    def forward(self, x):
        self._check_input(x)
        if self.merged:
            return self.base_layer.forward(x)
        p = self.params
        base = self.base_layer
        W = base.effective_weight()  # (d_out, d_in)
        n = self.weight_norm()  # (d_out,), a constant for backward
        g = p[M_KEY] / n  # (d_out,)
        y = base.forward(x)  # (..., d_out) = x Wᵀ + b
        xd, dcache = dropout_forward(x, self.lora_dropout, self.dropout_rng, self.training)
        if dcache is None:
            bias = base.params.get("bias")
            u = y - bias if bias is not None else y.copy()  # x Wᵀ (..., d_out)
        else:
            u = xd @ W.T  # x̃ Wᵀ (..., d_in) @ (d_in, d_out) -> (..., d_out)
        lo, lcache = lowrank_forward(xd, p[A_KEY], p[B_KEY], self.scaling, keep_x=A_KEY not in self.frozen)
        v = u + lo  # x̃ Wᵀ + s·(x̃ Aᵀ)Bᵀ  (..., d_out)
        y += (g - 1) * u + g * lo  # y = base(x) + (g − 1) ⊙ u + g ⊙ lo
        self.cache = (lcache, dcache, n, v if M_KEY not in self.frozen else None)
        return y

    def backward(self, dy):
        if self.merged:
            return self.base_layer.backward(dy)
        lcache, dcache, n, v = self.cache
        p = self.params
        g = p[M_KEY] / n
        if M_KEY not in self.frozen:
            # y = ... + g ⊙ v − u + ...,  g = m / n (n constant)  =>  dm = Σ_N dy ⊙ v / n
            d_out = dy.shape[-1]
            dm = (dy.reshape(-1, d_out) * v.reshape(-1, d_out)).sum(axis=0)
            dm /= n
            self.accumulate(M_KEY, dm)
        dyg = dy * g  # (..., d_out)
        # lo = s·(x̃ Aᵀ)Bᵀ enters as g ⊙ lo  =>  the low-rank backward of dy ⊙ g
        dx_b, dA, dB = lowrank_backward(dyg, lcache, p[A_KEY], p[B_KEY], self.scaling,
                                        need_dA=A_KEY not in self.frozen, need_dB=B_KEY not in self.frozen)
        if dA is not None:
            self.accumulate(A_KEY, dA)
        if dB is not None:
            self.accumulate(B_KEY, dB)
        if dcache is None:
            # y = b + g ⊙ (x Wᵀ) + g ⊙ lo  =>  dx = (g ⊙ dy) W + dx_lo
            dx = self.base_layer.backward(dyg)
            dx += dx_b
        else:
            # y = base(x) + (g − 1) ⊙ (x̃ Wᵀ) + g ⊙ lo  =>  dx = dy W + drop'(((g − 1) ⊙ dy) W + dx_lo)
            dx = self.base_layer.backward(dy)
            dx_b += (dy * (g - 1)) @ self.base_layer.effective_weight()
            dx += dropout_backward(dx_b, dcache)
        self.cache = None
        return dx

    # --- merge -------------------------------------------------------------------------------------
    def merge(self) -> None:
        """W <- g ⊙ (W + s·B A) with g = m / ||W + s·B A|| (rows); g's norm is kept for unmerge."""
        if self.merged:
            raise RuntimeError("DoraLinear is already merged")
        W = self.base_weight_for_merge()
        n = self.weight_norm()
        g = self.params[M_KEY] / n
        W += self.delta_weight()
        W *= g[:, None]
        self._merge_norm = n
        self.merged = True

    def unmerge(self) -> None:
        """W <- W' / g − s·B A, with the norm stored at merge time (PEFT caches it the same way)."""
        if not self.merged:
            raise RuntimeError("DoraLinear is not merged")
        W = self.base_weight_for_merge()
        g = self.params[M_KEY] / self._merge_norm
        W /= g[:, None]
        W -= self.delta_weight()
        self._merge_norm = None
        self.merged = False

    def peft_state_dict(self) -> dict:
        out = super().peft_state_dict()
        out[M_KEY] = self.params[M_KEY]
        return out


@dataclass
class DoraConfig(LoraConfig):
    """PEFT's LoraConfig with ``use_dora=True`` (PEFT has no DoRA config class of its own; the
    registry resolves such a LoraConfig to this one, so that the layer is DoRA's)."""

    use_dora: bool = True

    def validate(self) -> None:
        super().validate()
        if self.use_dora is not True:
            raise ValueError(f"DoraConfig.use_dora must be True (plain LoRA is LoraConfig), got {self.use_dora!r}")

    def make_layer(self, path, base, rng):
        return DoraLinear(base, **self.layer_kwargs(path, base, rng))

    def layer_parameter_count(self, r: int, d_out: int, d_in: int) -> int:
        """A, B and the magnitude m (d_out,): r · (d_in + d_out) + d_out."""
        return r * (d_in + d_out) + d_out


RECIPES = (Recipe("dora", "DoRA", lambda options, size: DoraConfig.for_run(options, size), mixed_ranks=True),)
