"""DyLoRA: LoRA trained at a random rank each step, usable at any rank afterwards.

Valipour et al. 2023 (arXiv 2210.07558); facts from huawei-noah/Efficient-NLP
``DyLoRA/loralib/DyLoRA.py`` (spectral_peft's ALGORITHMS.md, DyLoRA section).

Shape legend: N tokens (any leading dims), d_in, d_out, r_max the stored rank, b the active rank.

    A (r_max, d_in), B (d_out, r_max), stored as PEFT LoRA at rank r_max
    each optimizer step: b ~ U{1, ..., r_max}, ONE b shared by all layers (the controller's stream);
    a layer given a smaller rank r by rank_pattern uses min(b, r) (r_max is the largest rank)
    y = base(x) + (α / b) · (drop(x) A[:b]ᵀ) B[:, :b]ᵀ         (rsLoRA: α / √b)
    mode "frozen" (the released default): only row b−1 of A and column b−1 of B get gradients
    mode "full": the first b rows of A and columns of B all get gradients
    evaluation at any b in 1..r_max without retraining (``set_rank``); at b = r_max the layer is
    exactly the PEFT LoRA its file describes (scaling α / r_max)
    merge: W <- W + (α / e) · B[:, :e] A[:e] at the EVALUATION rank e (r_max unless set_rank chose
    another), in train mode as in eval mode; unmerge subtracts that same e's product
    trainable parameters: r_max · (d_in + d_out)

The truncated layer at rank b IS plain LoRA with A[:b], B[:, :b] and α/b: the test proves it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .. import validation as V
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.lowrank import lowrank_backward, lowrank_forward
from .base import Controller, Recipe, adapter_layers
from .lora import A_KEY, B_KEY, LoraConfig, LoraLinear, lora_scaling

MODES = ("frozen", "full")


class DyLoraLinear(LoraLinear):
    """LoRA whose forward uses the first ``b`` rank components (module docstring).

    ``rank``: the training rank b (set each step by :class:`DyLoraController`);
    ``eval_rank``: the rank used in eval mode (default r_max; :func:`set_rank`).
    Cache: the low-rank cache at rank b and the dropout mask.
    """

    def __init__(self, base, mode: str = "frozen", **kwargs):
        super().__init__(base, **kwargs)
        if mode not in MODES:
            raise ValueError(f"DyLoRA mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.rank = self.r
        self.eval_rank = self.r
        self.merged_rank = None  # the rank merged into the base weight (unmerge subtracts it)

    @property
    def active_rank(self) -> int:
        return self.rank if self.training else self.eval_rank

    def scaling_at(self, b: int) -> float:
        return lora_scaling(b, self.lora_alpha, self.use_rslora)

    def set_rank(self, b: int, which: str = "both") -> None:
        """Use rank min(b, r_max) (a layer given a smaller r by rank_pattern stops at its own r)."""
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"DyLoRA rank must be an integer >= 1, got {b!r}")
        if which not in ("train", "eval", "both"):
            raise ValueError(f"which must be 'train', 'eval' or 'both', got {which!r}")
        if self.merged:
            raise RuntimeError("cannot change the rank of a merged DyLoRA layer; unmerge() first")
        b = min(int(b), self.r)
        if which in ("train", "both"):
            self.rank = b
        if which in ("eval", "both"):
            self.eval_rank = b

    def delta_weight(self, b: int | None = None):
        """ΔW at rank b (default the active rank): (α/b) · B[:, :b] A[:b]   (d_out, b) @ (b, d_in) -> (d_out, d_in)."""
        b = self.active_rank if b is None else b
        d = self.params[B_KEY][:, :b] @ self.params[A_KEY][:b]
        d *= self.scaling_at(b)
        return d

    def merge(self) -> None:
        """W <- W + ΔW at the evaluation rank (whatever the mode: merging is for inference)."""
        if self.merged:
            raise RuntimeError("DyLoraLinear is already merged")
        W = self.base_weight_for_merge()
        W += self.delta_weight(self.eval_rank)
        self.merged_rank = self.eval_rank
        self.merged = True

    def unmerge(self) -> None:
        """W <- W − ΔW at the rank that was merged."""
        if not self.merged:
            raise RuntimeError("DyLoraLinear is not merged")
        W = self.base_weight_for_merge()
        W -= self.delta_weight(self.merged_rank)
        self.merged_rank = None
        self.merged = False

    def forward(self, x):
        self._check_input(x)
        if self.merged:
            return self.base_layer.forward(x)
        b = self.active_rank
        p = self.params
        y = self.base_layer.forward(x)  # (..., d_out)
        xd, dcache = dropout_forward(x, self.lora_dropout, self.dropout_rng, self.training)
        yb, lcache = lowrank_forward(xd, p[A_KEY][:b], p[B_KEY][:, :b], self.scaling_at(b),
                                     keep_x=A_KEY not in self.frozen)
        y += yb  # y = base(x) + (α/b) · (x̃ A[:b]ᵀ) B[:, :b]ᵀ
        self.cache = (lcache, dcache, b)
        return y

    def _accumulate_rows(self, key: str, rows: slice, value, axis: int) -> None:
        """grads[key][rows along axis] += value (the rest of the gradient stays as it was)."""
        g = self.grads.get(key)
        if g is None:
            g = self.grads[key] = self.xp.zeros_like(self.params[key])
        if axis == 0:
            g[rows] += value
        else:
            g[:, rows] += value

    def backward(self, dy):
        if self.merged:
            return self.base_layer.backward(dy)
        lcache, dcache, b = self.cache
        p = self.params
        dx_b, dA, dB = lowrank_backward(dy, lcache, p[A_KEY][:b], p[B_KEY][:, :b], self.scaling_at(b),
                                        need_dA=A_KEY not in self.frozen, need_dB=B_KEY not in self.frozen)
        # "frozen": A[:b-1], B[:, :b-1] are detached in the forward, so only component b-1 learns
        lo = b - 1 if self.mode == "frozen" else 0
        if dA is not None:
            self._accumulate_rows(A_KEY, slice(lo, b), dA[lo:b], axis=0)
        if dB is not None:
            self._accumulate_rows(B_KEY, slice(lo, b), dB[:, lo:b], axis=1)
        dx = self.base_layer.backward(dy)  # y = base(x)  =>  dx = base'(dy)
        dx += dropout_backward(dx_b, dcache)
        self.cache = None
        return dx


def dylora_layers(model) -> list[tuple[str, DyLoraLinear]]:
    return adapter_layers(model, DyLoraLinear)


def set_rank(model, b: int, which: str = "eval") -> None:
    """Use rank b in every DyLoRA layer of ``model`` ("eval": for evaluation; "train"; "both")."""
    layers = dylora_layers(model)
    if not layers:
        raise ValueError("the model holds no DyLoRA layers")
    r_max = max(layer.r for _, layer in layers)
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= r_max:
        raise ValueError(f"rank must be in [1, r_max={r_max}], got {b!r}")
    for _, layer in layers:
        layer.set_rank(b, which)


def loss_by_rank(model, evaluate, ranks=None) -> dict:
    """{b: evaluate()} for every rank b (default 1..r_max), with the model in eval mode at rank b;
    the eval rank is put back to r_max afterwards. ``evaluate`` is a callable returning a float."""
    layers = dylora_layers(model)
    if not layers:
        raise ValueError("the model holds no DyLoRA layers")
    r_max = max(layer.r for _, layer in layers)
    out = {}
    was_training = model.training
    model.eval()
    try:
        for b in ranks or range(1, r_max + 1):
            set_rank(model, int(b), "eval")
            out[int(b)] = float(evaluate())
    finally:
        set_rank(model, r_max, "eval")
        model.train(was_training)
    return out


@dataclass
class DyLoraConfig(LoraConfig):
    """LoRA's fields plus DyLoRA's; written to adapter_config.json as PEFT LoRA at r = r_max."""

    dylora_mode: str = "frozen"  # "frozen" (released default): only component b−1 learns; "full"
    dylora_seed: int = 0  # seed of the shared rank stream

    def validate(self) -> None:
        super().validate()
        V.check_choice(self.name, "dylora_mode", self.dylora_mode, MODES)
        if self.use_dora:
            raise ValueError("DyLoraConfig.use_dora=True is not supported; use False")
        V.check_int(self.name, "dylora_seed", self.dylora_seed, min=0)

    def make_layer(self, path, base, rng):
        return DyLoraLinear(base, mode=self.dylora_mode, **self.layer_kwargs(path, base, rng))

    def make_controller(self, peft_model):
        return DyLoraController(peft_model, self)


class DyLoraController(Controller):
    """Draws b ~ U{1..r_max} before each training forward and sets it in every DyLoRA layer.

    The stream is a NumPy generator seeded with ``dylora_seed``. A draw is committed only when its
    step is taken (after_optimizer_step): before_forward always draws from the state after the last
    step TAKEN, so a step the NaN guard skips leaves the stream as it was and its rank is drawn
    again. ``rank`` is the rank of the current step; :meth:`state_dict` holds the committed state.
    """

    def __init__(self, peft_model, config: DyLoraConfig):
        self.model = peft_model
        self.layers = [m for _, m in dylora_layers(peft_model)]
        self.r_max = max((m.r for m in self.layers), default=0)
        self.rng = np.random.default_rng(config.dylora_seed)
        self.rank = self.committed_rank = self.r_max
        self.committed_state = self.rng.bit_generator.state  # the stream after the last step taken

    def before_forward(self, step: int) -> None:
        self.rng.bit_generator.state = self.committed_state
        self.rank = int(self.rng.integers(1, self.r_max + 1))  # b ~ U{1, ..., r_max}
        for layer in self.layers:
            layer.set_rank(self.rank, "train")

    def after_optimizer_step(self, step: int) -> None:
        self.committed_state = self.rng.bit_generator.state
        self.committed_rank = self.rank

    def state_dict(self) -> dict:
        return {"rng_state": json.dumps(self.committed_state), "rank": self.committed_rank}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = json.loads(state["rng_state"])
        self.committed_state = self.rng.bit_generator.state
        self.rank = self.committed_rank = int(state["rank"])
        for layer in self.layers:
            layer.set_rank(self.rank, "train")

    def report(self, evaluate) -> dict:
        """DyLoRA's promise, measured: the evaluation loss at every rank 1..r_max of one run."""
        by_rank = loss_by_rank(self.model, evaluate)
        return {"rank_eval": {"ranks": sorted(by_rank), "losses": [by_rank[b] for b in sorted(by_rank)]}}


RECIPES = (Recipe("dylora", "DyLoRA", lambda options, size: DyLoraConfig.for_run(options, size,
                                                                             dylora_mode=options.dylora_mode),
                  mixed_ranks=True),)
