"""AdaLoRA: SVD-shaped low-rank updates whose ranks are allocated from a global budget.

Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023
(arXiv 2303.10512); facts from PEFT 0.21.2 ``peft/tuners/adalora/{layer,model,config}.py`` and the
authors' ``loralib/adalora.py`` (spectral_peft's ALGORITHMS.md, AdaLoRA section).

Shape legend: N tokens (B·T, or any leading dims), d_in, d_out; r the layer's current rank
(init_r before any resizing); n the number of adapted matrices.

The update of one adapted linear is a triplet decomposition, ΔW = P Λ Q, stored as PEFT does:

    lora_A  (r, d_in)   Q, the right singular vectors (rows)
    lora_E  (r, 1)      Λ, the singular values
    lora_B  (d_out, r)  P, the left singular vectors (columns)

    y = base(x) + s · (drop(x) (A ⊙ E)ᵀ) Bᵀ,    s = scaling / (ranknum + 1e-5),
    scaling = lora_alpha if lora_alpha > 0 else r,   ranknum = init_r (fixed, never updated).

This file holds, in reading order: the orthogonal regulariser (a forward/backward pair), the
config, the layer, the rank allocator (sensitivity EMAs, triplet scores, the cubic budget, global
masking with an exact top-k) and the controller that runs it in PEFT's order in a training loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from .. import validation as V
from ..backend import get_xp, to_host
from ..module import Linear, Module
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.lowrank import lowrank_backward, lowrank_forward
from .adalora_allocator import RankAllocator, budget_schedule
from .base import AdapterConfig, AdapterLayer, Controller, Recipe, model_relative
RANKNUM_EPS = 1e-5  # PEFT: ranknum + 1e-5 in the denominator of the scale
ORTH_FORMS = ("peft", "paper")
TIE_BREAKS = ("index", "peft")


# ------------------------------------------------------------------------------------------------
# The orthogonal regulariser
# ------------------------------------------------------------------------------------------------
def orth_penalty_forward(A, B, form: str = "peft"):
    """The two orthogonality penalties of one triplet adapter.

    A (r, d_in), B (d_out, r) -> (pA, pB, cache) with, for form "peft" (PEFT and the authors' code),
    pA = ||A Aᵀ − I||_F and pB = ||Bᵀ B − I||_F (NOT squared); for form "paper" (Eq. 4) the
    squared norms. r = 0 gives (0, 0). The cache keeps the residuals RA = A Aᵀ − I (r, r) and
    RB = Bᵀ B − I (r, r) and the norms.
    """
    if form not in ORTH_FORMS:
        raise ValueError(f"orth_reg form must be one of {ORTH_FORMS}, got {form!r}")
    xp = get_xp(A)
    r = A.shape[0]
    eye = xp.eye(r, dtype=A.dtype)
    RA = A @ A.T - eye  # (r, d_in) @ (d_in, r) -> (r, r)
    RB = B.T @ B - eye  # (r, d_out) @ (d_out, r) -> (r, r)
    nA = float(xp.sqrt(xp.sum(RA * RA)))
    nB = float(xp.sqrt(xp.sum(RB * RB)))
    if form == "peft":
        return nA, nB, (RA, RB, nA, nB, form)
    return nA * nA, nB * nB, (RA, RB, nA, nB, form)


def orth_penalty_backward(dpA: float, dpB: float, cache, A, B):
    """Gradients of the penalties: returns (dA (r, d_in), dB (d_out, r)).

    R symmetric, so d||R||²_F = 2⟨R, dR⟩ with dR = dA Aᵀ + A dAᵀ (for RA) gives
    ∂||RA||²/∂A = 4 RA A and ∂||RB||²/∂B = 4 B RB; the non-squared norm divides by 2||R||.
    At R = 0 the norm has no gradient; the subgradient 0 is used (torch does the same).
    """
    RA, RB, nA, nB, form = cache
    if form == "peft":
        cA = 2.0 * dpA / nA if nA > 0 else 0.0  # p = ||RA||  =>  dA = 2 RA A / ||RA||
        cB = 2.0 * dpB / nB if nB > 0 else 0.0  # p = ||RB||  =>  dB = 2 B RB / ||RB||
    else:
        cA = 4.0 * dpA  # p = ||RA||²  =>  dA = 4 RA A
        cB = 4.0 * dpB  # p = ||RB||²  =>  dB = 4 B RB
    dA = RA @ A  # (r, r) @ (r, d_in) -> (r, d_in)
    dA *= cA
    dB = B @ RB  # (d_out, r) @ (r, r) -> (d_out, r)
    dB *= cB
    return dA, dB


def orth_regularizer(layers, weight: float, form: str = "peft", accumulate: bool = True) -> float:
    """weight · R over the adapter layers, adding its gradient into their grads when ``accumulate``.

    PEFT's R (AdaLoraModel.forward): the MEAN over all 2n matrices (every lora_A and lora_B of
    every adapted layer, all rows, masked triplets included, rank-0 ones counted with a zero
    penalty) of the non-squared Frobenius norms. The paper's R ("paper"): the SUM of the squared
    norms. Returns the value added to the loss.
    """
    layers = list(layers)
    if not layers or weight == 0:
        return 0.0
    count = 2 * len(layers)
    total = 0.0
    for layer in layers:
        A, B = layer.params["lora_A"], layer.params["lora_B"]
        pA, pB, cache = orth_penalty_forward(A, B, form)
        total += pA + pB
        if accumulate:
            # L = weight · (1/count)·Σ p  ("peft")  or  weight · Σ p  ("paper")
            coef = weight / count if form == "peft" else weight
            dA, dB = orth_penalty_backward(coef, coef, cache, A, B)
            if "lora_A" not in layer.frozen:
                layer.accumulate("lora_A", dA)
            if "lora_B" not in layer.frozen:
                layer.accumulate("lora_B", dB)
    return weight * (total / count if form == "peft" else total)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
@dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA's hyper-parameters, PEFT's field names and defaults (peft AdaLoraConfig).

    Validated at construction; every error names the field, its value and what would be right.
    """

    peft_type: ClassVar[str] = "ADALORA"

    target_modules: str | list[str] | None = None  # required: which linears to adapt (PEFT's matching rule)
    init_r: int = 12  # rank every matrix starts with (b(0) = init_r·n)
    target_r: int = 8  # average rank at the end (b(T) = target_r·n)
    tinit: int = 0  # warm-up steps without pruning
    tfinal: int = 0  # final steps with the pattern frozen
    deltaT: int = 1  # steps between two maskings
    beta1: float = 0.85  # EMA factor of the sensitivity Ī
    beta2: float = 0.85  # EMA factor of the uncertainty Ū
    orth_reg_weight: float = 0.5  # coefficient of the orthogonal regulariser
    total_step: int | None = None  # required, > 0: the schedule needs the run's length
    rank_pattern: dict | None = None  # {"<path>.lora_E": [bool]*init_r}: the allocation, written on save
    lora_alpha: float = 8  # scaling numerator (r when <= 0)
    lora_dropout: float = 0.0  # dropout on the branch input
    fan_in_fan_out: bool = False  # PEFT's flag for Conv1D bases; the engine's Linears are (d_out, d_in) anyway
    init_lora_weights: bool = True  # E = 0, A, B ~ N(0, 0.02); False: all three ~ N(0, 1) as PEFT's randn
    bias: str = "none"  # PEFT field, only "none" is supported
    modules_to_save: list[str] | None = None  # PEFT field, not supported (must be None)
    r: int = 8  # PEFT's LoraConfig field, unused by AdaLoRA (written for PEFT's loader)
    task_type: str | None = None  # PEFT's task type, carried through the file
    # engine options (not PEFT fields, not written to adapter_config.json):
    tie_break: str = "index"  # "index": keep exactly b (budget.topk_mask); "peft": prune all ties (<=)
    orth_reg_form: str = "peft"  # "peft": mean of ||·||_F; "paper": sum of ||·||²_F

    def __post_init__(self):
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        self.validate()

    def validate(self) -> None:
        n = "AdaLoraConfig"
        self.check_target_modules()
        V.check_int(n, "total_step", self.total_step, min=0, min_inclusive=False,
                    hint="the run's number of optimizer steps, which the budget schedule needs")
        for name in ("init_r", "target_r", "tinit", "tfinal"):
            V.check_int(n, name, getattr(self, name), min=0)
        V.check_int(n, "deltaT", self.deltaT, min=0, min_inclusive=False, hint="steps between maskings")
        if self.target_r > self.init_r:
            raise ValueError(f"AdaLoraConfig.target_r={self.target_r} exceeds init_r={self.init_r}; the budget "
                             f"only shrinks, so target_r must be <= init_r")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"AdaLoraConfig.tinit={self.tinit} must be < total_step - tfinal = "
                             f"{self.total_step} - {self.tfinal} = {self.total_step - self.tfinal}: the schedule "
                             f"leaves no budgeting phase; decrease tinit/tfinal or increase total_step")
        for name in ("beta1", "beta2"):
            V.check_float(n, name, getattr(self, name), min=0, max=1, max_inclusive=False, noun="a float")
        V.check_float(n, "orth_reg_weight", self.orth_reg_weight, min=0)
        V.check_float(n, "lora_alpha", self.lora_alpha, hint="a value <= 0 means lora_alpha = r")
        V.check_float(n, "lora_dropout", self.lora_dropout, min=0, max=1, max_inclusive=False, noun="a float")
        V.check_bool(n, "fan_in_fan_out", self.fan_in_fan_out)
        V.check_bool(n, "init_lora_weights", self.init_lora_weights)
        V.check_int(n, "r", self.r, min=0, min_inclusive=False, hint="PEFT's LoraConfig field, unused by AdaLoRA")
        V.check_optional_str(n, "task_type", self.task_type)
        if self.bias != "none":
            raise ValueError(f"AdaLoraConfig.bias={self.bias!r} is not supported; use 'none'")
        if self.modules_to_save:
            raise ValueError(f"AdaLoraConfig.modules_to_save={self.modules_to_save!r} is not supported; use None")
        V.check_str_list(n, "modules_to_save", self.modules_to_save, allow_none=True)
        V.check_choice(n, "tie_break", self.tie_break, TIE_BREAKS)
        V.check_choice(n, "orth_reg_form", self.orth_reg_form, ORTH_FORMS)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise ValueError(f"AdaLoraConfig.rank_pattern must be a dict {{'<path>.lora_E': [bool]*init_r}}, "
                                 f"got {type(self.rank_pattern).__name__}")
            for k, v in self.rank_pattern.items():
                if not isinstance(v, (list, tuple)) or len(v) != self.init_r:
                    raise ValueError(f"AdaLoraConfig.rank_pattern[{k!r}] must be a list of {self.init_r} "
                                     f"(init_r) booleans, got {v!r}")

    # --- AdapterConfig protocol ----------------------------------------------------------------
    def pattern_for(self, path: str) -> list[bool] | None:
        """The rank_pattern entry of the linear at ``path`` (keys are "<path>.lora_E"), or None."""
        if not self.rank_pattern:
            return None
        v = self.rank_pattern.get(f"{path}.lora_E")
        return None if v is None else [bool(b) for b in v]

    def make_layer(self, path: str, base: Linear, rng) -> AdaLoraLinear:
        pattern = self.pattern_for(path)
        r = self.init_r if pattern is None else int(sum(pattern))
        layer = AdaLoraLinear(base, r=r, lora_alpha=self.lora_alpha, ranknum=self.init_r,
                              lora_dropout=self.lora_dropout, rng=rng, init_lora_weights=self.init_lora_weights)
        layer.pattern = pattern
        return layer

    def make_controller(self, peft_model) -> AdaLoraController:
        return AdaLoraController(peft_model, self)

    def parameter_count(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Σ r_path · (d_in + 1 + d_out): A (r, d_in), E (r, 1), B (d_out, r); r_path = init_r, or
        the kept triplets of the rank_pattern a loaded file holds."""
        total = 0
        for path, (d_out, d_in) in shapes.items():
            pattern = self.pattern_for(path)
            r = self.init_r if pattern is None else int(sum(pattern))
            total += r * (d_in + 1 + d_out)
        return int(total)

    @classmethod
    def for_run(cls, options, init_r: int) -> AdaLoraConfig:
        """The main job's AdaLoRA at ``init_r``: target_r = 2/3 of it unless given; tinit and tfinal
        10% and 20% of the steps unless given (a run too short for both keeps a budgeting phase)."""
        target_r = options.target_r if options.target_r is not None else max(1, (2 * init_r) // 3)
        tinit = options.tinit if options.tinit is not None else max(0, options.steps // 10)
        tfinal = options.tfinal if options.tfinal is not None else max(0, options.steps // 5)
        if tinit >= options.steps - tfinal and options.tinit is None and options.tfinal is None:
            tinit, tfinal = 0, 0
        return cls(init_r=init_r, target_r=min(target_r, init_r), tinit=tinit, tfinal=tfinal, deltaT=options.deltaT,
                   beta1=options.beta1, beta2=options.beta2, orth_reg_weight=options.orth_reg_weight,
                   total_step=options.steps, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                   target_modules=options.target_list())

    def to_json_dict(self, peft_model=None) -> dict:
        """adapter_config.json in PEFT's fields. With ``peft_model``, rank_pattern is the pattern
        the layers hold now (the last mask applied), as PEFT's config.rank_pattern is."""
        pattern = self.rank_pattern
        if peft_model is not None:
            pattern = rank_pattern_of(peft_model) or pattern
        tm = self.target_modules
        return {
            "peft_type": self.peft_type, "task_type": self.task_type, "inference_mode": True,
            "base_model_name_or_path": None,
            "r": self.r, "init_r": self.init_r, "target_r": self.target_r, "tinit": self.tinit,
            "tfinal": self.tfinal, "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight, "total_step": self.total_step,
            "rank_pattern": pattern, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": tm if isinstance(tm, str) else list(tm),
            "fan_in_fan_out": self.fan_in_fan_out, "init_lora_weights": self.init_lora_weights,
            "bias": self.bias, "modules_to_save": self.modules_to_save,
            "use_dora": False, "use_rslora": False,
        }

    @classmethod
    def from_json_dict(cls, d: dict) -> AdaLoraConfig:
        """Build from adapter_config.json: known fields are taken, PEFT-only ones ignored."""
        if str(d.get("peft_type", "ADALORA")).upper() != "ADALORA":
            raise ValueError(f"adapter_config.json peft_type is {d.get('peft_type')!r}, expected 'ADALORA'")
        if d.get("use_dora"):
            raise ValueError("adapter_config.json use_dora=True: AdaLoRA does not support DoRA")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("init_lora_weights") not in (None, True, False):
            kwargs["init_lora_weights"] = True
        return cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------
class AdaLoraLinear(AdapterLayer):
    """PEFT's SVDLinear: y = base(x) + s · (drop(x) (A ⊙ E)ᵀ) Bᵀ (module docstring for shapes).

    x (..., d_in) -> y (..., d_out). Parameters under PEFT's names: lora_A (r, d_in), lora_E (r, 1),
    lora_B (d_out, r). ``ranknum`` (init_r) stays fixed through resizing, as in PEFT, so a resized
    adapter computes exactly what the masked one did. ``pattern`` is the layer's allocation, a list
    of init_r booleans (None: all kept), set by the allocator and used to resize on save.

    The branch reuses ops.lowrank with A' = A ⊙ E; the cache is the low-rank cache (the branch
    input and x A'ᵀ (..., r)) plus the dropout mask; the base linear keeps nothing (it is frozen).
    """

    def __init__(self, base: Linear, r: int, lora_alpha: float, ranknum: int, lora_dropout: float = 0.0,
                 rng=None, init_lora_weights: bool = True):
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"AdaLoraLinear r must be an integer >= 0 (0 is allowed, PEFT #1539), got {r!r}")
        if ranknum < 0:
            raise ValueError(f"AdaLoraLinear ranknum must be >= 0 (init_r), got {ranknum!r}")
        if rng is None:
            raise ValueError("AdaLoraLinear needs rng, the host numpy Generator initial values are drawn from")
        super().__init__(base)
        d_out, d_in = base.d_out, base.d_in
        dtype, xp = base.dtype, base.xp
        # PEFT draws randn for all three, then (init_lora_weights) E = 0, A, B ~ N(0, 0.02).
        if init_lora_weights:
            A = rng.normal(0.0, 0.02, size=(r, d_in))
            rng.standard_normal((r, 1))  # drawn and discarded: the same stream whatever the flag
            E = np.zeros((r, 1))
            B = rng.normal(0.0, 0.02, size=(d_out, r))
        else:
            A = rng.standard_normal((r, d_in))
            E = rng.standard_normal((r, 1))
            B = rng.standard_normal((d_out, r))
        self.params["lora_A"] = xp.asarray(A.astype(dtype))
        self.params["lora_E"] = xp.asarray(E.astype(dtype))
        self.params["lora_B"] = xp.asarray(B.astype(dtype))
        self.lora_alpha = lora_alpha
        self.ranknum = float(ranknum)
        self.lora_dropout = float(lora_dropout)
        self.dropout_rng = self.make_dropout_rng(rng, lora_dropout)
        self.pattern: list[bool] | None = None
        self.merged = False

    # --- sizes and scale -----------------------------------------------------------------------
    @property
    def r(self) -> int:
        return int(self.params["lora_A"].shape[0])

    def adapter_parameter_count(self) -> int:
        """r · (d_in + d_out + 1): A (r, d_in), B (d_out, r), E (r, 1) at the layer's current rank."""
        return self.r * (self.d_in + self.d_out + 1)

    @property
    def scaling(self) -> float:
        """PEFT: lora_alpha if lora_alpha > 0 else r (the rank the layer was built with)."""
        return float(self.lora_alpha) if self.lora_alpha > 0 else float(self.r)

    @property
    def scale(self) -> float:
        """s = scaling / (ranknum + 1e-5), the factor the branch is multiplied by."""
        return self.scaling / (self.ranknum + RANKNUM_EPS)

    def delta_weight(self):
        """ΔW = s · B (A ⊙ E)  (d_out, r) @ (r, d_in) -> (d_out, d_in)."""
        p = self.params
        return (p["lora_B"] @ (p["lora_A"] * p["lora_E"])) * self.scale

    def _refuse_if_merged(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(f"cannot {what} a merged AdaLoraLinear (W holds its update); unmerge() first")

    # --- forward / backward --------------------------------------------------------------------
    def forward(self, x):
        if x.shape[-1] != self.d_in:
            raise ValueError(f"AdaLoraLinear expects inputs (..., {self.d_in}), got {x.shape}")
        p = self.params
        y = self.base_layer.forward(x)  # (..., d_in) -> (..., d_out)
        if self.r == 0 or self.merged:  # pruned to rank 0 (allowed, PEFT #1539), or merged: the base
            self.cache = None
            return y
        xd, dcache = dropout_forward(x, self.lora_dropout, self.dropout_rng, self.training)
        AE = p["lora_A"] * p["lora_E"]  # (r, d_in) ⊙ (r, 1) -> (r, d_in)
        need_dA = "lora_A" not in self.frozen or "lora_E" not in self.frozen
        dy_branch, lcache = lowrank_forward(xd, AE, p["lora_B"], self.scale, keep_x=need_dA)
        y += dy_branch  # (..., d_out)
        self.cache = (lcache, dcache)
        return y

    def backward(self, dy):
        if self.r == 0 or self.merged:
            return self.base_layer.backward(dy)
        lcache, dcache = self.cache
        p = self.params
        A, E, B = p["lora_A"], p["lora_E"], p["lora_B"]
        need_AE = "lora_A" not in self.frozen or "lora_E" not in self.frozen
        AE = A * E  # recomputed (r, d_in): parameters are never cached
        dx_b, dAE, dB = lowrank_backward(dy, lcache, AE, B, self.scale, need_dA=need_AE,
                                         need_dB="lora_B" not in self.frozen, need_dx=True)
        if dB is not None:
            self.accumulate("lora_B", dB)
        if dAE is not None:
            if "lora_A" not in self.frozen:
                # A' = A ⊙ E  =>  dA = dA' ⊙ E            (r, d_in) ⊙ (r, 1)
                self.accumulate("lora_A", dAE * E)
            if "lora_E" not in self.frozen:
                # A' = A ⊙ E  =>  dE = Σ_j dA'_ij A_ij    (r, d_in) -> (r, 1)
                self.accumulate("lora_E", (dAE * A).sum(axis=1, keepdims=True))
        dx = self.base_layer.backward(dy)  # y = base(x)  =>  dx = base'(dy)
        # branch input = drop(x)  =>  dx += drop'(dx_branch)
        dx += dropout_backward(dx_b, dcache)
        self.cache = None
        return dx

    # --- allocation, resizing and files --------------------------------------------------------
    def apply_mask(self, keep) -> None:
        """Zero lora_E where ``keep`` (r,) is False, in place (PEFT's masked_fill_), and record the
        pattern. Masked triplets contribute nothing to the output until an optimizer step revives E."""
        self._refuse_if_merged("mask")
        xp = self.xp
        keep = xp.asarray(keep, dtype=bool).reshape(-1)
        if keep.shape != (self.r,):
            raise ValueError(f"mask must have shape ({self.r},) (the layer's rank), got {tuple(keep.shape)}")
        self.params["lora_E"][~keep] = 0
        self.pattern = [bool(b) for b in to_host(keep)]

    def resize(self, keep) -> None:
        """Keep only the triplets where ``keep`` (r,) is True: E[idx], A[idx], B[:, idx]; ranknum
        (hence the scale, when lora_alpha > 0) is unchanged, gradients are dropped."""
        self._refuse_if_merged("resize")
        xp = self.xp
        keep = xp.asarray(keep, dtype=bool).reshape(-1)
        if keep.shape != (self.r,):
            raise ValueError(f"keep must have shape ({self.r},) (the layer's rank), got {tuple(keep.shape)}")
        idx = xp.nonzero(keep)[0]
        p = self.params
        p["lora_A"] = xp.ascontiguousarray(p["lora_A"][idx])
        p["lora_E"] = xp.ascontiguousarray(p["lora_E"][idx])
        p["lora_B"] = xp.ascontiguousarray(p["lora_B"][:, idx])
        self.grads = {}

    def peft_state_dict(self) -> dict:
        """{"lora_A", "lora_B", "lora_E"} arrays as PEFT writes them: resized to ``pattern`` when the
        layer still has its init_r triplets (PEFT's resize_state_dict_by_rank_pattern)."""
        p = self.params
        if self.pattern is not None and len(self.pattern) == self.r and not all(self.pattern):
            xp = self.xp
            idx = xp.nonzero(xp.asarray(self.pattern, dtype=bool))[0]
            return {"lora_A": p["lora_A"][idx], "lora_B": p["lora_B"][:, idx], "lora_E": p["lora_E"][idx]}
        return {"lora_A": p["lora_A"], "lora_B": p["lora_B"], "lora_E": p["lora_E"]}

    def load_peft_state_dict(self, arrays: dict) -> None:
        """Install PEFT's arrays (host or device); all are checked before any is installed."""
        want = {"lora_A": (self.r, self.d_in), "lora_E": (self.r, 1), "lora_B": (self.d_out, self.r)}
        missing = [k for k in want if k not in arrays]
        if missing:
            raise KeyError(f"AdaLoRA arrays {missing} missing; expected keys {sorted(want)}")
        for k, shape in want.items():
            if tuple(arrays[k].shape) != shape:
                raise ValueError(f"{k} has shape {tuple(arrays[k].shape)}, the layer needs {shape} "
                                 f"(rank {self.r}; a resized file needs its rank_pattern in the config)")
        self._refuse_if_merged("load arrays into")
        xp = self.xp
        for k in want:
            self.params[k] = xp.asarray(to_host(arrays[k]).astype(self.dtype))
        self.grads = {}


def adalora_layers(model: Module) -> list[tuple[str, AdaLoraLinear]]:
    """(path, layer) of every AdaLoraLinear in ``model``, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoraLinear)]


def rank_pattern_of(model: Module) -> dict | None:
    """{"<path>.lora_E": [bool]*init_r} of every layer with a pattern, or None if none has one."""
    out = {f"{model_relative(n)}.lora_E": list(m.pattern) for n, m in adalora_layers(model) if m.pattern is not None}
    return out or None


def resize_to_rank_pattern(model: Module, rank_pattern: dict) -> None:
    """Resize every layer named in ``rank_pattern`` to its kept triplets (PEFT's
    resize_modules_by_rank_pattern). Every entry is checked before any layer changes."""
    layers = {f"{model_relative(n)}.lora_E": m for n, m in adalora_layers(model)}
    unknown = sorted(set(rank_pattern) - set(layers))
    if unknown:
        raise KeyError(f"rank_pattern names {unknown}, which are not AdaLoRA layers; layers: {sorted(layers)}")
    for k, v in rank_pattern.items():
        if len(v) != layers[k].r:
            raise ValueError(f"rank_pattern[{k!r}] has {len(v)} entries, the layer has rank {layers[k].r}")
    for k, v in rank_pattern.items():
        layers[k].resize(v)
        layers[k].pattern = [bool(b) for b in v]


# ------------------------------------------------------------------------------------------------
# The controller: the training loop's view of AdaLoRA
# ------------------------------------------------------------------------------------------------
class AdaLoraController(Controller):
    """Runs AdaLoRA in PEFT's order: backward -> regularize() (its gradient joins the loss's) ->
    optimizer.step -> after_optimizer_step(step) (= update_and_allocate) -> zero_grad.

    ``history`` records (step, budget, kept triplets) at every masking step, for the b(t) figure.
    ``allocator_seconds`` accumulates the wall time spent allocating (the benchmark reports it).
    """

    def __init__(self, model: Module, config: AdaLoraConfig):
        self.config = config
        self.layers = adalora_layers(model)
        self.allocator = RankAllocator(self.layers, config)
        self.history: list[tuple[int, int, int]] = []
        self.allocator_seconds = 0.0

    def regularize(self) -> float:
        c = self.config
        return orth_regularizer([m for _, m in self.layers], c.orth_reg_weight, c.orth_reg_form)

    def after_optimizer_step(self, step: int) -> None:
        t0 = time.perf_counter()
        budget, pattern = self.allocator.update_and_allocate(step)
        if pattern is not None:
            kept = int(sum(sum(v) for v in pattern.values()))
            self.history.append((int(step), int(budget), kept))
        self.allocator_seconds += time.perf_counter() - t0

    def rank_pattern(self) -> dict | None:
        return self.allocator.frozen_pattern or rank_pattern_of_layers(self.layers)

    def state_dict(self) -> dict:
        st = self.allocator.state_dict()
        st["history"] = [list(h) for h in self.history]
        return st

    def load_state_dict(self, state: dict) -> None:
        self.allocator.load_state_dict(state)
        self.history = [tuple(h) for h in state.get("history", [])]

    def report(self, evaluate) -> dict:
        """The figures' data: the kept triplets of every layer (rank_pattern, final_ranks), the
        singular values E, and the budget b(t) of every step with the maskings that happened."""
        pattern = self.rank_pattern() or {f"{model_relative(p)}.lora_E": [True] * m.r for p, m in self.layers}
        short = {p: _short_path(p) for p, _ in self.layers}
        alloc, steps = self.allocator, range(int(self.config.total_step))
        return {
            "rank_pattern": {k: [bool(b) for b in v] for k, v in pattern.items()},
            "final_ranks": {short[p]: int(sum(m.pattern)) if m.pattern is not None else m.r for p, m in self.layers},
            "lora_E": {short[p]: [float(v) for v in to_host(m.params["lora_E"]).reshape(-1)] for p, m in self.layers},
            "budget_schedule": {
                "step": list(steps), "budget": [int(alloc.budget_schedule(t)[0]) for t in steps],
                "init_bgt": int(alloc.init_bgt), "target_bgt": int(alloc.target_bgt),
                "masked": [[int(a), int(b), int(k)] for a, b, k in self.history],
            },
        }


def _short_path(path: str) -> str:
    """A layer's path as the figures label it: relative to the wrapped model, "transformer." dropped."""
    return model_relative(path).replace("transformer.", "")


def rank_pattern_of_layers(layers) -> dict | None:
    out = {f"{model_relative(n)}.lora_E": list(m.pattern) for n, m in layers if m.pattern is not None}
    return out or None


__all__ = [
    "AdaLoraConfig", "AdaLoraLinear", "AdaLoraController", "RankAllocator", "budget_schedule",
    "orth_penalty_forward", "orth_penalty_backward", "orth_regularizer", "adalora_layers",
    "rank_pattern_of", "resize_to_rank_pattern",
]


RECIPES = (Recipe("adalora", "AdaLoRA", lambda options, init_r: AdaLoraConfig.for_run(options, init_r), knob="init_r",
                  preset="init_r"),)
