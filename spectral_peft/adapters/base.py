"""What every adapter shares: choosing target linears, wrapping them, and training-time hooks.

An adapter layer is a :class:`~spectral_peft.module.Module` that holds the frozen base layer as
its child ``base_layer`` (PEFT's attribute name) and exposes the same ``forward(x) -> y`` /
``backward(dy) -> dx`` contract as :class:`~spectral_peft.module.Linear`, so it can replace the
base anywhere in a model. The base may be a dense :class:`Linear` or a quantised linear; adapters
only use ``base_layer.forward``, ``base_layer.backward`` and ``base_layer.effective_weight()``.

Training-time behaviour that is not a forward/backward (AdaLoRA's allocator, DyLoRA's rank draw,
Delta-LoRA's weight update, RoSA's gradient collection) is a :class:`Controller`, which the
training loop calls in PEFT's order:

    before_forward(step) -> forward -> backward -> (N ranks: all-reduce) -> regularize() -> NaN guard -> (clip)
    -> after_backward(step) -> optimizer.step -> lr step -> after_optimizer_step(step) -> zero_grad

A step the NaN guard skips runs nothing after the guard, so a controller stages what a step draws
or collects and commits it in after_optimizer_step (spectral_peft/train.py).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import validation as V
from ..module import Linear, Module, linear_paths, match_target_modules  # noqa: F401 - re-exported


MODEL_PREFIX = "base_model.model."  # where PeftModel keeps the wrapped model (PEFT's file keys start so)


def model_relative(path: str) -> str:
    """``path`` relative to the wrapped model: a PeftModel path loses its "base_model.model."
    (PEFT's rank_pattern and alpha_pattern keys are written so); other paths are unchanged."""
    return path[len(MODEL_PREFIX):] if path.startswith(MODEL_PREFIX) else path


def pattern_value(pattern: dict | None, path: str, default):
    """PEFT's per-module override rule (``get_pattern_key``): the first key k, in dict order, with
    ``re.match(r"(.*\\.)?(k)$", path)`` gives the value; no match gives ``default``. ``path`` is
    taken relative to the wrapped model."""
    path = model_relative(path)
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def inject_adapters(model: Module, target_modules, make_adapter: Callable[[str, Linear], Module]) -> list[str]:
    """Freeze every base parameter, then replace each target linear by ``make_adapter(path, base)``.

    All adapters are built before any is installed, so a failure (a bad rank, say) leaves the
    model untouched. Returns the wrapped paths.
    """
    paths = match_target_modules(model, target_modules)
    adapters = {p: make_adapter(p, model.get_submodule(p)) for p in paths}
    model.freeze_all()
    for p, a in adapters.items():
        model.set_submodule(p, a)
    return paths


def adapter_layers(model: Module, cls: type | tuple[type, ...] | None = None) -> list[tuple[str, Module]]:
    """(path, layer) of every adapter layer (a module with a ``base_layer`` child) in the model."""
    out = []
    for name, m in model.named_modules():
        if hasattr(m, "base_layer") and (cls is None or isinstance(m, cls)):
            out.append((name, m))
    return out


class AdapterLayer(Module):
    """What every adapter layer shares: the frozen base as ``base_layer`` (PEFT's attribute name),
    the sizes, dtype and namespace read from it, and the seeded dropout stream of its branch."""

    def __init__(self, base: Linear):
        super().__init__()
        self.base_layer = base
        self.merged = False  # True once merge() has added ΔW into the base weight

    @property
    def d_in(self) -> int:
        return self.base_layer.d_in

    @property
    def d_out(self) -> int:
        return self.base_layer.d_out

    @property
    def dtype(self):
        return self.base_layer.dtype

    @property
    def xp(self):
        return self.base_layer.xp

    def delta_weight(self):
        """The dense ΔW (d_out, d_in) the adapter adds to its base (each method's own)."""
        raise NotImplementedError

    def effective_weight(self):
        """The dense (d_out, d_in) matrix this layer applies: W + ΔW (the base alone once merged)."""
        if self.merged:
            return self.base_layer.effective_weight()
        return self.base_layer.effective_weight() + self.delta_weight()

    def merge(self) -> None:
        """W <- W + ΔW (in the weight's dtype); the forward becomes the base alone."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged")
        W = self.base_weight_for_merge()
        W += self.delta_weight()
        self.merged = True

    def unmerge(self) -> None:
        """W <- W − ΔW: restores W up to rounding."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged")
        W = self.base_weight_for_merge()
        W -= self.delta_weight()
        self.merged = False

    def base_weight_for_merge(self):
        """The base's dense weight (d_out, d_in), which merge() adds the delta into; a TypeError for
        a quantised base, whose weight is not a dense array to add into (dequantise first)."""
        base = self.base_layer
        if type(base).effective_weight is not Linear.effective_weight:
            raise TypeError(f"cannot merge into a {type(base).__name__} base (a quantised weight); "
                            "dequantise the model first")
        return base.params["weight"]

    def make_dropout_rng(self, rng, p: float):
        """The branch's dropout generator, on the backend, seeded from the host stream ``rng``
        (None when p == 0: the stream is only drawn from when dropout is on)."""
        return self.xp.random.default_rng(int(rng.integers(2**63 - 1))) if p > 0 else None


class Controller:
    """Training-time behaviour of a method, called by the loop in PEFT's order (module docstring).

    Every hook is a no-op by default. ``state_dict``/``load_state_dict`` carry whatever the
    method needs to resume bit-exactly (scores, masks, RNG streams, collection progress) as a
    flat dict of arrays and JSON-able values.
    """

    def before_forward(self, step: int) -> None:
        pass

    def regularize(self) -> float:
        """Add a regulariser's gradient into the adapter grads; return its value (added to the loss)."""
        return 0.0

    def gradient_statistics(self) -> list:
        """Arrays the backward filled from this rank's batch and that are linear in the loss, as
        gradients are (RoSA's collected dense gradients): under N ranks the trainer all-reduces
        them with the gradients (Σ n_r a_r / Σ n_r), right after the backward."""
        return []

    def after_backward(self, step: int) -> None:
        """Runs once the gradients are complete, after the NaN guard and the clipping, before the
        optimizer (LoRA-FA's corrected gradient, from the clipped g_B as PEFT's optimizer does)."""

    def after_optimizer_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def report(self, evaluate: Callable[[], float]) -> dict:
        """Plain data (JSON-able) that the results and figures need from this method at the end of
        training: AdaLoRA's ranks and budget, RoSA's supports, DyLoRA's loss at every rank.
        ``evaluate()`` gives the model's evaluation loss now (for methods that compare settings)."""
        return {}


class AdapterConfig:
    """The protocol of every method's config dataclass (LoraConfig, AdaLoraConfig, RosaConfig, ...).

    Subclasses are dataclasses with PEFT's field names, validated in ``__post_init__`` (through
    :meth:`validate`); they build one adapter layer and the method's controller, count their
    trainable parameters in closed form, and read and write adapter_config.json.
    """

    peft_type: ClassVar[str] = ""

    @property
    def name(self) -> str:
        """The class name, which every validation message starts with."""
        return type(self).__name__

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what would be right."""

    def check_target_modules(self) -> None:
        """``target_modules`` must name the linears to adapt: a list of names or a regex string (PEFT's rule)."""
        if getattr(self, "target_modules", None) is None:
            raise ValueError(f"{self.name}.target_modules is None; name the linears to adapt, e.g. ['c_attn', 'c_proj']")
        V.check_str_list(self.name, "target_modules", self.target_modules, allow_str=True)

    def make_layer(self, path: str, base: Linear, rng) -> Module:
        """The adapter layer wrapping ``base`` at ``path`` (relative to the wrapped model); ``rng``
        is the host generator (numpy.random.Generator) all initial values are drawn from, in model
        order."""
        raise NotImplementedError

    def make_controller(self, peft_model) -> Controller | None:
        """The method's training-time controller, or None when it needs none."""
        return None

    def parameter_count(self, shapes: dict[str, tuple[int, int]]) -> int:
        """Trainable parameters of the adapters this config puts on linears of the given
        ``{path: (d_out, d_in)}`` (paths relative to the wrapped model): the closed formula, equal
        to what the built model trains (RoSA's sparse values counted at their final nnz)."""
        raise NotImplementedError

    def to_json_dict(self, peft_model=None) -> dict:
        """The adapter_config.json content, PEFT's field names (peft_model: for state such as
        AdaLoRA's rank_pattern)."""
        raise NotImplementedError

    @classmethod
    def from_json_dict(cls, d: dict) -> AdapterConfig:
        raise NotImplementedError


@dataclass(frozen=True)
class Recipe:
    """How the main job (``spectral-peft run``) runs one method: each method file lists its own.

    ``make_config(options, size)`` builds the method's config from the run's options (an object
    with the fields of spectral_peft.commands.run_options.RunConfig) at the budget knob ``size``;
    the budget matcher (spectral_peft.budget) chooses ``size`` through the config's
    :meth:`AdapterConfig.parameter_count`. ``knob`` names it: "r" (an int rank; with
    ``mixed_ranks`` some modules may take r + 1 through PEFT's rank_pattern), "init_r" (an int) or
    "d" (a density in [0, 1]); "" for a method without adapters (full fine-tuning), whose
    ``make_config`` returns None.
    """

    name: str  # the --methods name
    title: str  # how tables and figures name it
    make_config: Callable[[Any, Any], AdapterConfig | None]
    knob: str = "r"
    quantized: bool = False  # fine-tunes on a 4-bit base (QLoRA, QRoSA)
    mixed_ranks: bool = False
    preset: str = ""  # the run option that, when set (not None), fixes the knob instead of the budget
    lr_option: str = "lr"  # the run option holding its learning rate
    own_budget: bool = False  # trains at its own size (the preset), far under the budget: Quantum-PEFT
