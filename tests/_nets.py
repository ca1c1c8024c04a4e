"""Tiny models shared by the adapter tests."""
import numpy as np

from spectral_peft.module import Linear, Module


class TwoLinear(Module):
    """x (N, 5) -> a (6, 5) -> b (4, 6) -> (N, 4): two adaptable linears named "a" and "b"."""

    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.a = Linear(rng.standard_normal((6, 5)))
        self.b = Linear(rng.standard_normal((4, 6)))

    def forward(self, x):
        return self.b.forward(self.a.forward(x))

    def backward(self, dy):
        return self.a.backward(self.b.backward(dy))


class Bag(Module):
    """A model made only of the given layers, named l0, l1, ... in order."""

    def __init__(self, layers):
        super().__init__()
        for i, m in enumerate(layers):
            setattr(self, f"l{i}", m)
