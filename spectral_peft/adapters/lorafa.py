"""LoRA-FA: LoRA with A frozen at its random init, so the layer never keeps its input.

Zhang et al. 2023 (arXiv 2308.03303); the corrected gradient from PEFT 0.21.2
``peft/optimizers/lorafa.py`` (spectral_peft's ALGORITHMS.md, LoRA-FA section).

Shape legend: N tokens (any leading dims), d_in, d_out, r.

    y  = base(x) + s · (x Aᵀ) Bᵀ,  A (r, d_in) frozen, B (d_out, r) trained
    dB = s · dYᵀ (x Aᵀ)             needs only x Aᵀ (N, r): the cache holds that, never x (N, d_in)
    dx = dY W + s · (dY B) A        needs no activation at all
    trainable parameters: d_out · r

So the branch's activation memory drops from N·(d_in + r) to N·r numbers per adapted linear
(``Module.activation_bytes`` shows it). The gradient of B is exactly LoRA's (the test proves it).

PEFT's LoRA-FA optimizer also offers a corrected gradient, the least-squares B-gradient that best
reproduces full fine-tuning's update of W through the frozen A:

    g_B <- (1/s²) · g_B · (A Aᵀ + 1e-8 I)⁻¹              (r, r) solve; pinv as in PEFT

Here it is an option (``LoraFAConfig.corrected_grad``) applied by a controller in after_backward,
which the Trainer runs after clipping, so the correction sees the clipped gradient exactly as PEFT's
optimizer does (the Trainer clips, then calls optimizer.step, which corrects), and any optimizer
then sees the corrected gradient. PEFT's optimizer also applies weight decay after its Adam update:
:func:`lorafa_optimizer` gives that update (``optim.LoraFAAdamW``), PEFT's create_lorafa_optimizer.
(PEFT computes the correction under bf16 autocast where available; the engine in the model's dtype.)
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import validation as V
from ..backend import get_xp
from ..optim import LoraFAAdamW
from .base import Controller, Recipe, adapter_layers
from .lora import A_KEY, B_KEY, LoraConfig, LoraLinear

CORRECTION_EPS = 1e-8  # PEFT: delta added to the diagonal of A Aᵀ


class LoraFALinear(LoraLinear):
    """LoRA with ``lora_A.weight`` frozen: caches x Aᵀ (N, r) only (module docstring)."""

    def __init__(self, base, **kwargs):
        super().__init__(base, **kwargs)
        self.freeze(A_KEY)

    def adapter_parameter_count(self) -> int:
        """d_out · r (docs/lora.md)."""
        return self.d_out * self.r


def corrected_gradient(gB, A, scale: float):
    """(1/s²) · g_B · (A Aᵀ + 1e-8 I)⁻¹: gB (d_out, r), A (r, d_in) -> (d_out, r)."""
    xp = get_xp(A)
    r = A.shape[0]
    M = A @ A.T + CORRECTION_EPS * xp.eye(r, dtype=A.dtype)  # (r, r)
    return (gB @ xp.linalg.pinv(M)) * (1.0 / scale**2)  # (d_out, r) @ (r, r)


def lorafa_optimizer(peft_model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                     eps: float = 1e-6) -> LoraFAAdamW:
    """PEFT's create_lorafa_optimizer: the LoraFAOptimizer update over the trainable parameters
    (B of every LoRA-FA layer; A is frozen by the layer), with PEFT's default eps 1e-6."""
    return LoraFAAdamW(peft_model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


@dataclass
class LoraFAConfig(LoraConfig):
    """LoRA's fields plus LoRA-FA's option; written to adapter_config.json as PEFT LoRA (A is in
    the file, since PEFT needs it to rebuild the layer)."""

    corrected_grad: bool = False  # PEFT's projected gradient for B (module docstring)

    def validate(self) -> None:
        super().validate()
        if self.use_dora:
            raise ValueError("LoraFAConfig.use_dora=True is not supported; use False")
        V.check_bool(self.name, "corrected_grad", self.corrected_grad)

    def make_layer(self, path, base, rng):
        return LoraFALinear(base, **self.layer_kwargs(path, base, rng))

    def layer_parameter_count(self, r: int, d_out: int, d_in: int) -> int:
        """Only B (d_out, r) trains: A is frozen at its initial draw."""
        return r * d_out

    def make_controller(self, peft_model):
        return LoraFAController(peft_model) if self.corrected_grad else None


class LoraFAController(Controller):
    """Replaces every g_B by the corrected gradient once the gradients are complete and clipped."""

    def __init__(self, peft_model):
        self.layers = [m for _, m in adapter_layers(peft_model, LoraFALinear)]

    def after_backward(self, step: int) -> None:
        for layer in self.layers:
            g = layer.grads.get(B_KEY)
            if g is not None:
                g[...] = corrected_gradient(g, layer.params[A_KEY], layer.scaling)


RECIPES = (Recipe("lorafa", "LoRA-FA", lambda options, size: LoraFAConfig.for_run(options, size), mixed_ranks=True),)
