"""Delta-LoRA: LoRA whose base weight also moves, by the change of the low-rank product.

Zi et al. 2023 (arXiv 2309.02411), Algorithm 1 (spectral_peft's ALGORITHMS.md, Delta-LoRA section).

Shape legend: d_in, d_out, r.

    A (r, d_in), B (d_out, r) trained as LoRA; no dropout on the branch (the paper removes it so
    that the product's change is the update the branch actually saw)
    after optimizer step t (t > K):  W <- W + λ · s · (B⁽ᵗ⁺¹⁾ A⁽ᵗ⁺¹⁾ − B⁽ᵗ⁾ A⁽ᵗ⁾)
    t counts from 0 (the paper's Algorithm 1: for t = 0, ..., T − 1; if t > K), so W stays fixed
    over the first K + 1 steps and moves from the (K + 2)-th on
    the delta OF THE PRODUCTS, not the product of the deltas; λ = 2, K = 500 in the paper
    trainable parameters: r · (d_in + d_out) (W changes but gets no gradient and no optimizer state)

The controller keeps the previous step's factors A⁽ᵗ⁾, B⁽ᵗ⁾ (r·(d_in + d_out) numbers per layer)
rather than the (d_out, d_in) product, and forms the difference as one rank-2r product:

    B' A' − B A = [B' | B] @ [A' ; −A]      (d_out, 2r) @ (2r, d_in) -> (d_out, d_in)

The adapter file holds A and B only: the moved W belongs to the model's own weights
(save the base model too).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import validation as V
from ..backend import get_xp, to_host
from ..module import Linear
from .base import Controller, Recipe, adapter_layers
from .lora import A_KEY, B_KEY, LoraConfig, LoraLinear


class DeltaLoraLinear(LoraLinear):
    """LoRA without branch dropout, over a dense base whose weight the controller moves."""

    def __init__(self, base, **kwargs):
        if type(base).effective_weight is not Linear.effective_weight:
            raise TypeError(f"Delta-LoRA updates the base weight, so it needs a dense Linear base, "
                            f"got {type(base).__name__}")
        if kwargs.get("lora_dropout", 0.0) != 0.0:
            raise ValueError(f"Delta-LoRA uses no dropout on the branch; lora_dropout must be 0.0, "
                             f"got {kwargs['lora_dropout']!r}")
        super().__init__(base, **kwargs)


@dataclass
class DeltaLoraConfig(LoraConfig):
    """LoRA's fields plus Delta-LoRA's; written to adapter_config.json as PEFT LoRA."""

    delta_lambda: float = 2.0  # λ, the paper's update ratio
    delta_start_step: int = 500  # K: W moves after step index t > K (t counts from 0)

    def validate(self) -> None:
        super().validate()
        if self.lora_dropout != 0.0:
            raise ValueError(f"DeltaLoraConfig.lora_dropout must be 0.0 (Delta-LoRA removes the branch's "
                             f"dropout), got {self.lora_dropout!r}")
        if self.use_dora:
            raise ValueError("DeltaLoraConfig.use_dora=True is not supported; use False")
        V.check_float(self.name, "delta_lambda", self.delta_lambda)
        V.check_int(self.name, "delta_start_step", self.delta_start_step, min=0)

    def make_layer(self, path, base, rng):
        return DeltaLoraLinear(base, **self.layer_kwargs(path, base, rng))

    def make_controller(self, peft_model):
        return DeltaLoraController(peft_model, self)


class DeltaLoraController(Controller):
    """Moves every base weight by λ·s·(B'A' − BA) after each optimizer step past K.

    ``step`` is the 0-based index t of the optimizer step just taken, as the Trainer passes it (0 after
    the first step); W moves when t > K (the paper's convention, module docstring).
    State: the previous factors of every layer (for exact resume).
    """

    def __init__(self, peft_model, config: DeltaLoraConfig):
        self.layers = adapter_layers(peft_model, DeltaLoraLinear)
        self.delta_lambda = float(config.delta_lambda)
        self.start = int(config.delta_start_step)
        self.prev = {path: (m.params[A_KEY].copy(), m.params[B_KEY].copy()) for path, m in self.layers}

    def after_optimizer_step(self, step: int) -> None:
        for path, m in self.layers:
            A1, B1 = m.params[A_KEY], m.params[B_KEY]
            A0, B0 = self.prev[path]
            if step > self.start:
                if m.merged:
                    raise RuntimeError(f"{path} is merged; Delta-LoRA cannot move a merged base weight")
                xp = get_xp(A1)
                # W <- W + λ·s·(B'A' − BA) = W + λ·s · [B' | B] @ [A' ; −A]
                delta = xp.concatenate([B1, B0], axis=1) @ xp.concatenate([A1, -A0], axis=0)
                delta *= self.delta_lambda * m.scaling
                m.base_layer.params["weight"] += delta
            A0[...] = A1
            B0[...] = B1

    def state_dict(self) -> dict:
        out = {}
        for path, (A0, B0) in self.prev.items():
            out[f"{path}.prev_A"] = to_host(A0)
            out[f"{path}.prev_B"] = to_host(B0)
        return out

    def load_state_dict(self, state: dict) -> None:
        for path, (A0, B0) in self.prev.items():  # check every key and shape first
            for key, arr in ((f"{path}.prev_A", A0), (f"{path}.prev_B", B0)):
                if key not in state or tuple(state[key].shape) != tuple(arr.shape):
                    raise ValueError(f"Delta-LoRA state {key!r}: expected shape {tuple(arr.shape)}, got "
                                     f"{None if key not in state else tuple(state[key].shape)}")
        for path, (A0, B0) in self.prev.items():
            xp = get_xp(A0)
            A0[...] = xp.asarray(state[f"{path}.prev_A"])
            B0[...] = xp.asarray(state[f"{path}.prev_B"])


RECIPES = (Recipe("deltalora", "Delta-LoRA", lambda options, size: DeltaLoraConfig.for_run(
    options, size, lora_dropout=0.0, delta_lambda=options.delta_lambda, delta_start_step=options.delta_start_step),
    mixed_ranks=True),)
