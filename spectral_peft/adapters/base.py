"""What every adapter shares: choosing target linears, wrapping them, and training-time hooks.

An adapter layer is a :class:`~spectral_peft.module.Module` that holds the frozen base layer as
its child ``base_layer`` (PEFT's attribute name) and exposes the same ``forward(x) -> y`` /
``backward(dy) -> dx`` contract as :class:`~spectral_peft.module.Linear`, so it can replace the
base anywhere in a model. The base may be a dense :class:`Linear` or a quantised linear; adapters
only use ``base_layer.forward``, ``base_layer.backward`` and ``base_layer.effective_weight()``.

Training-time behaviour that is not a forward/backward (AdaLoRA's allocator, DyLoRA's rank draw,
Delta-LoRA's weight update, RoSA's gradient collection) is a :class:`Controller`, which the
training loop calls in PEFT's order:

    before_forward(step) -> forward -> backward -> regularize() -> after_backward(step)
    -> (clip) -> optimizer.step -> lr step -> after_optimizer_step(step) -> zero_grad
"""
from __future__ import annotations

from collections.abc import Callable

from ..module import Linear, Module, linear_paths, match_target_modules  # noqa: F401 - re-exported


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

    def after_backward(self, step: int) -> None:
        """Runs once the gradients are complete, before clipping and the optimizer (e.g. LoRA-FA's
        corrected gradient, RoSA's gradient collection)."""

    def after_optimizer_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
