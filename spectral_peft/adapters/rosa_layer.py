"""RoSA's layer: a frozen base linear plus a low-rank s·B A and a sparse S on a chosen support.

The equations, shapes and key names are adapters/rosa.py's (its module docstring); the config,
schedules, support choice and recipes live there too. This file is the forward/backward of one
adapted linear, its merge and its adapter-file tensors.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import to_host
from ..budget import topk_mask
from ..module import Linear
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.lowrank import lowrank_backward, lowrank_forward
from ..sparse import CSR, SDDMM_IMPLS, sp_add, spmm, spmm_t
from .base import AdapterLayer

A_KEY, B_KEY = "rosa_A.weight", "rosa_B.weight"
VALUES_KEY = "rosa_spa.values"
ROW_OFFS_KEY, COL_IDX_KEY, ROW_IDX_KEY = "rosa_spa.row_offs", "rosa_spa.col_idx", "rosa_spa.row_idx"

IMPLS = ("auto", "sp_add", "spmm")
GRAD_ACC_MODES = ("mean_squared", "mean")


def check_density(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} (the density of the sparse adapter) must lie in [0, 1], got {value!r}")
    return float(value)


def nnz_for(density: float, shape: tuple[int, int]) -> int:
    """k = int(density · numel), the number of entries a (d_out, d_in) matrix keeps: peft-rosa's
    rounding, the density times the entry count (not (d · d_out) · d_in, which can differ by one)."""
    return int(check_density(density, "d") * (shape[0] * shape[1]))


# --- the layer -------------------------------------------------------------------------------------
class RosaLinear(AdapterLayer):
    """A frozen base linear plus s·B A + S (see the module docstring for equations and shapes).

    ``params``: ``rosa_A.weight`` (r, d_in) and ``rosa_B.weight`` (d_out, r) when r > 0;
    ``rosa_spa.values`` (nnz,) when d > 0: zero at creation, listed as trainable from the start
    (so an optimizer built at step 0 holds it) but given a gradient only once a support is set
    and the schedule's agenda includes 'spa'; before that the backward never touches it.
    Child ``base_layer``: the frozen Linear (dense or quantised).
    """

    PEFT_OPTIONAL_KEYS = (ROW_IDX_KEY,)  # derived from row_offs; the adapter loader accepts a file without it

    def __init__(self, base: Linear, r: int, d: float, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 impl: str = "sp_add", use_rslora: bool = False, init_lora_weights: bool | str = True,
                 grad_acc_mode: str = "mean_squared", sddmm_impl: str = "planned", rng=None):
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"r must be an integer >= 0, got {r!r}")
        check_density(d, "d")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if grad_acc_mode not in GRAD_ACC_MODES:
            raise ValueError(f"grad_acc_mode must be one of {GRAD_ACC_MODES}, got {grad_acc_mode!r}")
        if sddmm_impl not in SDDMM_IMPLS:
            raise ValueError(f"sddmm_impl must be one of {sorted(SDDMM_IMPLS)}, got {sddmm_impl!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {lora_dropout!r}")
        rng = np.random.default_rng(0) if rng is None else rng
        super().__init__(base)
        self.r, self.d, self.lora_alpha = r, float(d), lora_alpha
        self.impl = "sp_add" if impl == "auto" else impl
        self.lora_dropout = float(lora_dropout)
        self.grad_acc_mode = grad_acc_mode
        self.sddmm_impl = sddmm_impl
        # peft-rosa: scaling 1 when r == 0; alpha/√r with rsLoRA; else alpha/r
        self.scaling = 1.0 if r == 0 else (lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r)
        d_out, d_in = base.d_out, base.d_in
        xp, dtype = base.xp, base.dtype
        if r > 0:
            # init drawn on the host so CPU and GPU start equal (backend.host_rng's rule)
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=√5) on (r, d_in): U(-1/√d_in, 1/√d_in)
            if init_lora_weights == "gaussian":
                A = rng.normal(0.0, 1.0 / r, size=(r, d_in))
            else:
                A = rng.uniform(-bound, bound, size=(r, d_in))
            if init_lora_weights is False:  # nn.Linear's default init of B (fan_in r)
                B = rng.uniform(-1.0 / math.sqrt(r), 1.0 / math.sqrt(r), size=(d_out, r))
            else:
                B = np.zeros((d_out, r))
            self.params[A_KEY] = xp.asarray(A.astype(dtype))
            self.params[B_KEY] = xp.asarray(B.astype(dtype))
        self.nnz = nnz_for(d, (d_out, d_in)) if d > 0 else 0
        if d > 0:
            # listed as trainable from the start, so an optimizer built before the support is chosen
            # (the 'wl' schedules) still updates it; until then it gets no gradient and stays zero
            self.params[VALUES_KEY] = xp.zeros(self.nnz, dtype=dtype)
        self.spa: CSR | None = None
        self.dropout_rng = self.make_dropout_rng(rng, lora_dropout)
        # gradient collection (the support selection): running sum of G or G², and its count, of the
        # steps taken; the current step's G waits in pending_* until the step is taken (commit_collection)
        self.collecting = False
        self.grad_sum = None
        self.grad_count = 0
        self.pending_sum = None
        self.pending_count = 0
        self.merged = False

    # --- shapes and counts ---

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in)

    def adapter_parameter_count(self) -> int:
        """r·(d_in + d_out) + int(d · (d_out · d_in)): A, B and the sparse values (trainable from
        creation; they get a gradient once the support is set)."""
        return self.r * (self.d_in + self.d_out) + self.nnz

    # --- the support ---
    def set_support(self, support, reset_values: bool = True) -> None:
        """Install the support: a boolean (d_out, d_in) mask or a CSR of this layer's shape with
        exactly nnz = int(d · numel) entries. Values are zeroed unless ``reset_values`` is False
        (resuming), and are trained from the next backward."""
        if self.d <= 0:
            raise ValueError("this RoSA layer has d = 0: it has no sparse adapter to give a support")
        if self.merged:
            raise RuntimeError("cannot change the support of a merged RosaLinear (W holds S); unmerge() first")
        if isinstance(support, CSR):
            shape, count = support.shape, support.nnz
        else:
            shape, count = tuple(support.shape), int(support.sum())
        if tuple(shape) != self.shape:
            raise ValueError(f"support mask has shape {tuple(shape)} but the layer's weight is {self.shape} (d_out, d_in)")
        if count != self.nnz:
            raise ValueError(f"support mask has {count} entries but the layer keeps exactly nnz = int(d·numel) = "
                             f"int({self.d}·{self.d_out * self.d_in}) = {self.nnz}")
        values = self.params[VALUES_KEY]
        if isinstance(support, CSR):
            csr = CSR(values, self.xp.asarray(support.indptr), self.xp.asarray(support.indices), self.shape)
        else:
            csr = CSR.from_mask(self.xp.asarray(support), values=values)
        if reset_values:
            values[...] = 0
        self.spa = csr
        self.frozen.discard(VALUES_KEY)

    def support_mask(self):
        """Boolean (d_out, d_in) support, or None before one is set."""
        return None if self.spa is None else self.spa.mask()

    def _sparse(self) -> CSR | None:
        """The support with the current values array (the optimizer updates it in place, but a
        loader may have replaced it)."""
        if self.spa is None or self.nnz == 0:
            return None
        values = self.params[VALUES_KEY]
        if self.spa.values is not values:
            self.spa.values = values
        return self.spa

    def delta_weight(self):
        """ΔW = s·B A + S, dense (d_out, d_in) (for merging and for checks; never used in training)."""
        xp = self.xp
        delta = xp.zeros(self.shape, dtype=self.dtype)
        if self.r > 0:
            delta += self.scaling * (self.params[B_KEY] @ self.params[A_KEY])
        S = self._sparse()
        if S is not None:
            delta += S.to_dense()
        return delta

    # --- gradient collection ---
    def collected_scores(self):
        """|mean of the collected gradients| (d_out, d_in): mean(G²) or |mean(G)|."""
        if self.grad_count == 0 or self.grad_sum is None:
            raise ValueError("cannot choose a support collected over zero batches: grad_count is 0 "
                             "(run at least one forward/backward with collecting=True, spa_num_grads >= 1)")
        mean = self.grad_sum / self.grad_count
        return mean if self.grad_acc_mode == "mean_squared" else abs(mean)

    def select_support(self):
        """The boolean mask of the nnz largest collected scores (budget.topk_mask's tie-break)."""
        return topk_mask(self.collected_scores(), self.nnz)

    def clear_collection(self) -> None:
        self.grad_sum, self.grad_count = None, 0
        self.discard_pending()

    def discard_pending(self) -> None:
        """Drop the gradients of a step that was not taken (the NaN guard skipped it)."""
        self.pending_sum, self.pending_count = None, 0

    def commit_collection(self) -> None:
        """The step is taken: its collected gradient (all-reduced over the ranks by then, under
        N ranks) joins the running sum, squared first in mode "mean_squared"."""
        if self.pending_count == 0:
            return
        if self.grad_acc_mode == "mean_squared":
            self.pending_sum *= self.pending_sum
        if self.grad_sum is None:
            self.grad_sum = self.pending_sum
        else:
            self.grad_sum += self.pending_sum
        self.grad_count += self.pending_count
        self.discard_pending()

    def _collect(self, dy2, x2) -> None:
        """The step's dense gradient of the frozen W is kept as it is (linear in the loss, so the
        ranks' can be all-reduced like the parameters' gradients) and squared when committed."""
        G = dy2.T @ x2  # dense weight gradient of the frozen W: (d_out, N) @ (N, d_in) -> (d_out, d_in)
        if self.pending_sum is None:
            self.pending_sum = G
        else:
            self.pending_sum += G
        self.pending_count += 1

    # --- forward / backward ---
    def sparse_weight(self):
        """W + S (d_out, d_in): the dense part 'sp_add' multiplies by (the low-rank branch stays apart)."""
        W = self.base_layer.effective_weight()
        S = self._sparse()
        return W if S is None else sp_add(W, S)  # (d_out, d_in)

    def forward(self, x):
        if x.shape[-1] != self.d_in:
            raise ValueError(f"RosaLinear expects inputs (..., {self.d_in}), got {x.shape}")
        if self.merged:
            self.cache = None
            return self.base_layer.forward(x)
        S = self._sparse()
        lora_trainable = self.r > 0 and A_KEY not in self.frozen
        values_trainable = S is not None and VALUES_KEY not in self.frozen
        keep_x = values_trainable or self.collecting
        if self.impl == "sp_add":
            y = x @ self.sparse_weight().T  # (..., d_in) @ (d_in, d_out) -> (..., d_out)
            bias = self.base_layer.params.get("bias")
            if bias is not None:
                y += bias
        else:
            y = self.base_layer.forward(x)  # x Wᵀ + b; the frozen base caches no activations
            if S is not None:
                y += spmm(S, x)  # + x Sᵀ
        lr_cache = drop_cache = None
        if self.r > 0:
            xd = x
            if self.lora_dropout > 0 and self.training:
                xd, drop_cache = dropout_forward(x, self.lora_dropout, self.dropout_rng, True)
            y_lr, lr_cache = lowrank_forward(xd, self.params[A_KEY], self.params[B_KEY], self.scaling,
                                             keep_x=lora_trainable)
            y += y_lr  # + s·(dropout(x) Aᵀ) Bᵀ
        self.cache = (x if keep_x else None, lr_cache, drop_cache)
        return y

    def backward(self, dy):
        if self.merged:
            return self.base_layer.backward(dy)
        if self.cache is None:
            raise RuntimeError("RosaLinear.backward called without a forward (or twice)")
        x, lr_cache, drop_cache = self.cache
        d_out, d_in = self.shape
        dy2 = dy.reshape(-1, d_out)  # (N, d_out)
        S = self._sparse()
        if x is not None:
            x2 = x.reshape(-1, d_in)  # (N, d_in)
            if S is not None and VALUES_KEY not in self.frozen:
                # y = x (W + S)ᵀ  =>  dS = dYᵀ X, read on the support only (SDDMM)   -> (nnz,)
                self.accumulate(VALUES_KEY, SDDMM_IMPLS[self.sddmm_impl](dy2, x2, S))
            if self.collecting:
                self._collect(dy2, x2)
        if self.impl == "sp_add":
            # y = x (W + S)ᵀ  =>  dX = dY (W + S)      (..., d_out) @ (d_out, d_in) -> (..., d_in)
            dx = dy @ self.sparse_weight()
        else:
            dx = self.base_layer.backward(dy)  # y = x Wᵀ  =>  dX = dY W
            if S is not None:
                dx += spmm_t(S, dy)  # y += x Sᵀ  =>  dX += dY S
        if self.r > 0:
            need_dA = A_KEY not in self.frozen
            need_dB = B_KEY not in self.frozen
            dxd, dA, dB = lowrank_backward(dy, lr_cache, self.params[A_KEY], self.params[B_KEY], self.scaling,
                                           need_dA=need_dA, need_dB=need_dB, need_dx=True)
            if drop_cache is not None:
                dxd = dropout_backward(dxd, drop_cache)  # xd = dropout(x)  =>  dX += mask ⊙ dXd / (1-p)
            dx += dxd  # y += s·(xd Aᵀ) Bᵀ  =>  dX += s·(dY B) A
            if dA is not None:
                self.accumulate(A_KEY, dA)
            if dB is not None:
                self.accumulate(B_KEY, dB)
        self.cache = None
        return dx

    # --- adapter file ---
    def peft_state_dict(self) -> dict:
        """This layer's adapter-file arrays (host NumPy), keyed by peft-rosa's suffixes.

        The CSR buffers use peft-rosa's dtypes (row_offs int32; col_idx, row_idx int16 when the
        dimension fits, else int32). Before a support is set they are zero, which peft-rosa
        reads as "no sparse adapter yet" (row_offs[-1] == 0)."""
        out = {}
        if self.r > 0:
            out[A_KEY] = to_host(self.params[A_KEY])
            out[B_KEY] = to_host(self.params[B_KEY])
        if self.d > 0:
            d_out, d_in = self.shape
            col_dtype = np.int16 if d_in <= np.iinfo(np.int16).max else np.int32
            row_dtype = np.int16 if d_out <= np.iinfo(np.int16).max else np.int32
            out[VALUES_KEY] = to_host(self.params[VALUES_KEY])
            if self.spa is None:
                out[ROW_OFFS_KEY] = np.zeros(d_out + 1, dtype=np.int32)
                out[COL_IDX_KEY] = np.zeros(self.nnz, dtype=col_dtype)
                out[ROW_IDX_KEY] = np.zeros(d_out, dtype=row_dtype)
            else:
                out[ROW_OFFS_KEY] = to_host(self.spa.indptr).astype(np.int32)
                out[COL_IDX_KEY] = to_host(self.spa.indices).astype(col_dtype)
                out[ROW_IDX_KEY] = to_host(self.spa.row_idx).astype(row_dtype)
        return out

    def load_peft_state_dict(self, arrays: dict) -> None:
        """Install arrays read from an adapter file (keys as in :meth:`peft_state_dict`; row_idx
        optional, it is derived). Everything is checked before anything is installed."""
        d_out, d_in = self.shape
        expected = {}
        if self.r > 0:
            expected[A_KEY] = (self.r, d_in)
            expected[B_KEY] = (d_out, self.r)
        if self.d > 0:
            expected[VALUES_KEY] = (self.nnz,)
            expected[ROW_OFFS_KEY] = (d_out + 1,)
            expected[COL_IDX_KEY] = (self.nnz,)
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise ValueError(f"RoSA adapter arrays missing {missing} (r={self.r}, d={self.d}, shape {self.shape})")
        allowed = set(expected) | ({ROW_IDX_KEY} if self.d > 0 else set())
        extra = sorted(set(arrays) - allowed)
        if extra:
            raise ValueError(f"unexpected RoSA adapter arrays {extra} for a layer with r={self.r}, d={self.d}")
        for key, shape in expected.items():
            if tuple(np.shape(arrays[key])) != shape:
                raise ValueError(f"{key}: shape {tuple(np.shape(arrays[key]))} does not fit this layer, expected {shape}")
        csr = None
        if self.d > 0:
            row_offs = np.asarray(arrays[ROW_OFFS_KEY]).astype(np.int64)
            if row_offs[-1] != 0 or self.nnz == 0:
                csr = CSR(np.asarray(arrays[VALUES_KEY], dtype=np.float64),
                          row_offs, np.asarray(arrays[COL_IDX_KEY]).astype(np.int64), self.shape)  # validates
        xp, dtype = self.xp, self.dtype
        for key in expected:
            if key in (ROW_OFFS_KEY, COL_IDX_KEY):
                continue
            self.params[key][...] = xp.asarray(np.asarray(arrays[key]).astype(dtype))
        if self.d > 0:
            if csr is not None:
                self.set_support(csr, reset_values=False)
            else:
                self.spa = None
