"""AdaLoRA's rank allocator: the importance scores of every triplet and the cubic global budget.

The equations are adalora.py's (its module docstring, Zhang et al. 2023 Eqs. 9-14); this file holds
the part that acts on all layers at once: PEFT's ``RankAllocator`` (sensitivity EMA Ī, uncertainty
Ū, the triplet score S_i), the budget schedule b(t), and the masking of the lowest-scored triplets
to b(t), exactly k by the engine's tie-break (spectral_peft.budget) or PEFT's ``<=`` threshold.

Shape legend: per layer A (r, d_in), E (r, 1), B (d_out, r); n layers; b(t) triplets kept in all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..backend import get_xp
from ..budget import threshold_mask_le, topk_mask
from .base import model_relative

if TYPE_CHECKING:  # the annotation only: adalora.py imports this module
    from .adalora import AdaLoraConfig

PARAM_KEYS = ("lora_A", "lora_E", "lora_B")  # PEFT's ParameterDict names; file keys drop the adapter name


def budget_schedule(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    deltaT: int) -> tuple[int, bool]:
    """The cubic budget b(t) and whether step t masks (PEFT's RankAllocator.budget_schedule).

    t <= tinit: b(0), no masking. t > T − tfinal: b(T), masking (the frozen pattern).
    Otherwise b = int((b(0) − b(T)) · (1 − (t − tinit)/(T − tfinal − tinit))³ + b(T)), masking when
    t % deltaT == 0. (The paper's Eq. 14 writes t − tinit − tfinal in the numerator, a typo.)
    """
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt)
    return budget, step % deltaT == 0


class RankAllocator:
    """Sensitivity-based global rank allocation over the AdaLoRA layers (PEFT's RankAllocator).

    For every entry θ of A, E, B:  I = |θ · ∂L/∂θ|,  Ī ← β1 Ī + (1−β1) I,  Ū ← β2 Ū + (1−β2)|I − Ī|,
    s = Ī · Ū. Triplet score (Eq. 9): S_i = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki)).
    Masking keeps the b(t) best triplets across ALL layers, exactly (``tie_break="index"``: ties
    go to the smaller flat index, layers in model order then triplet index, budget.topk_mask) or
    PEFT's rule (``"peft"``: prune every score <= the (b(0)−b)-th smallest, so ties may leave
    fewer than b).

    ``layers``: (name, AdaLoraLinear) in model order; names are the rank_pattern keys' stems.
    """

    def __init__(self, layers, config: AdaLoraConfig):
        self.layers = list(layers)
        self.config = config
        self.init_bgt = int(sum(m.r for _, m in self.layers))  # PEFT: Σ rows of every lora_A
        self.target_bgt = int(config.target_r * len(self.layers))
        self.frozen_pattern: dict | None = None  # set at t = T − tfinal
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict = {}  # (layer name, key) -> Ī, the parameter's shape
        self.exp_avg_unc: dict = {}  # (layer name, key) -> Ū

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        return budget_schedule(step, self.init_bgt, self.target_bgt, c.tinit, c.tfinal, c.total_step, c.deltaT)

    def update_ipt(self) -> None:
        """Update Ī and Ū of every parameter from the parameters and their current gradients
        (after the optimizer step, before zero_grad, as PEFT does)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, m in self.layers:
            for key in PARAM_KEYS:
                p = m.params[key]
                g = m.grads.get(key)
                xp = get_xp(p)
                ipt = xp.abs(p * g) if g is not None else xp.zeros_like(p)  # I = |θ · g|
                ema = self.exp_avg_ipt.get((name, key))
                if ema is None:
                    ema = self.exp_avg_ipt[(name, key)] = xp.zeros_like(p)
                    self.exp_avg_unc[(name, key)] = xp.zeros_like(p)
                unc = self.exp_avg_unc[(name, key)]
                ema *= b1  # Ī ← β1 Ī + (1 − β1) I
                ema += (1 - b1) * ipt
                ipt -= ema  # Ū ← β2 Ū + (1 − β2) |I − Ī|, with the updated Ī
                xp.abs(ipt, out=ipt)
                unc *= b2
                unc += (1 - b2) * ipt

    def triplet_scores(self) -> list:
        """S per layer, each (r,): s(E) + (mean over d_in of s(A) + mean over d_out of s(B))."""
        out = []
        for name, m in self.layers:
            s = {k: self.exp_avg_ipt[(name, k)] * self.exp_avg_unc[(name, k)] if (name, k) in self.exp_avg_ipt
                 else m.xp.zeros_like(m.params[k]) for k in PARAM_KEYS}
            vec = s["lora_A"].mean(axis=1) + s["lora_B"].mean(axis=0)  # (r,) + (r,)
            out.append(s["lora_E"].reshape(-1) + vec)  # (r,)
        return out

    def mask_to_budget(self, budget: int) -> dict:
        """Zero E of all but the ``budget`` best triplets; returns the rank_pattern."""
        scores = self.triplet_scores()
        xp = get_xp(*scores) if scores else None
        if not scores:
            return {}
        flat = xp.concatenate(scores)  # (init_bgt,), layers in model order
        budget = min(max(int(budget), 0), int(flat.size))
        if self.config.tie_break == "peft":
            keep = threshold_mask_le(flat, int(flat.size) - budget)
        else:
            keep = topk_mask(flat, budget)
        return self._apply(keep)

    def _apply(self, keep) -> dict:
        pattern, start = {}, 0
        for name, m in self.layers:
            k = keep[start:start + m.r]
            start += m.r
            m.apply_mask(k)
            pattern[f"{model_relative(name)}.lora_E"] = list(m.pattern)
        return pattern

    def mask_using_rank_pattern(self, pattern: dict) -> None:
        for name, m in self.layers:
            m.apply_mask(pattern[f"{model_relative(name)}.lora_E"])

    def update_and_allocate(self, step: int) -> tuple[int, dict | None]:
        """One allocation step (PEFT's AdaLoraModel.update_and_allocate): returns (budget, the
        pattern applied at this step or None).

        t < T − tfinal: update the EMAs, mask to b(t) when the schedule says so.
        t = T − tfinal: mask to b(T) once more, freeze that pattern, reset the EMAs.
        t > T − tfinal: re-apply the frozen pattern (E may have revived during the step); a run
        that reaches this phase without a frozen pattern (started past T − tfinal) freezes one first.
        """
        c = self.config
        final = c.total_step - c.tfinal
        if step < final:
            self.update_ipt()
            budget, mask_ind = self.budget_schedule(step)
            return budget, (self.mask_to_budget(budget) if mask_ind else None)
        if step == final or self.frozen_pattern is None:
            budget = self.target_bgt
            self.frozen_pattern = self.mask_to_budget(budget)
            self.reset_ipt()
            return budget, self.frozen_pattern
        self.mask_using_rank_pattern(self.frozen_pattern)
        return self.target_bgt, self.frozen_pattern

    # --- exact resume --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        st = {"init_bgt": self.init_bgt, "target_bgt": self.target_bgt, "frozen_pattern": self.frozen_pattern,
              "patterns": {name: m.pattern for name, m in self.layers}}
        for (name, key), v in self.exp_avg_ipt.items():
            st[f"exp_avg_ipt/{name}/{key}"] = v.copy()
            st[f"exp_avg_unc/{name}/{key}"] = self.exp_avg_unc[(name, key)].copy()
        return st

    def load_state_dict(self, state: dict) -> None:
        names = [n for n, _ in self.layers]
        if state.get("init_bgt") != self.init_bgt or sorted(state.get("patterns", {})) != sorted(names):
            raise ValueError(f"allocator state is for init_bgt={state.get('init_bgt')} and layers "
                             f"{sorted(state.get('patterns', {}))}; this model has init_bgt={self.init_bgt} "
                             f"and layers {sorted(names)}")
        ipt, unc = {}, {}
        for name, m in self.layers:
            for key in PARAM_KEYS:
                k = f"exp_avg_ipt/{name}/{key}"
                if k in state:
                    xp = m.xp
                    ipt[(name, key)] = xp.asarray(state[k]).astype(m.dtype)
                    unc[(name, key)] = xp.asarray(state[f"exp_avg_unc/{name}/{key}"]).astype(m.dtype)
        self.exp_avg_ipt, self.exp_avg_unc = ipt, unc
        self.frozen_pattern = state.get("frozen_pattern")
        for name, m in self.layers:
            pat = state["patterns"][name]
            m.pattern = None if pat is None else [bool(b) for b in pat]
