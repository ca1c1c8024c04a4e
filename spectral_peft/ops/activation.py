"""Element-wise activations: GELU (tanh and erf forms), SiLU, ReLU, tanh, and the HF name table.

Shape legend: x, y, dy, dx all (...), any shape; float32 stays float32.

The gated activations share one form, y = x · s(x), whose derivative is
    dy/dx = s(x) + x · s'(x):
  GELU, tanh form ("gelu_new", GPT-2):  s = ½(1 + tanh(k(x + c x³))),  k = √(2/π), c = 0.044715,
                                        s' = 2 s (1 - s) · k (1 + 3c x²)
  GELU, erf form ("gelu", BERT):        s = Φ(x) = ½(1 + erf(x/√2)),     s' = φ(x) = e^(-x²/2)/√(2π)
  SiLU ("silu", "swish", LLaMA):        s = σ(x) = 1/(1 + e^(-x)),       s' = s (1 - s)
SwiGLU (LLaMA's MLP, Shazeer 2020): y = silu(g) ⊙ u of two projections g (gate_proj), u (up_proj):
    du = dy ⊙ g σ(g),   dg = dy ⊙ u ⊙ (σ + g σ (1 - σ)).
Their caches hold (x, s): x is needed for x · s', and keeping s saves recomputing the
transcendental (tanh, erf, exp) in the backward, the costliest pass. Derivations: docs/ops.md.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_xp, get_xpx

GELU_K = math.sqrt(2.0 / math.pi)  # k in the tanh form (HF NewGELUActivation)
GELU_C = 0.044715
INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
GELU_APPROXIMATIONS = ("tanh", "none")


def _special(xp):
    """scipy.special on NumPy, cupyx.scipy.special on CuPy (for erf)."""
    xpx = get_xpx(xp)
    if xpx is None:
        import scipy.special  # noqa: PLC0415

        return scipy.special
    return xpx.scipy.special


def sigmoid(x):
    """σ(x) = ½·(1 + tanh(x/2)), (...) -> (...) a new array in x's dtype.

    The identity is exact and overflow-free for every x; NumPy's vectorised tanh makes it ~7x
    faster than scipy.special.expit in float32 (equal to it within an ulp of ½). Where σ is tiny
    (x ≪ 0) its error is absolute, ~1e-16 in float64, not relative: σ only ever multiplies an O(1)
    quantity here (x in SiLU, the gate in SwiGLU), so the products keep their scale-relative accuracy.
    """
    s = x * 0.5
    get_xp(x).tanh(s, out=s)
    s *= 0.5
    s += 0.5
    return s


def _check_float(x, name: str) -> None:
    if getattr(x, "dtype", None) is None or x.dtype.kind != "f" or x.ndim == 0:
        raise ValueError(f"{name}: x must be a float array with at least one axis, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {getattr(x, 'shape', None)}")


def _gated_backward(dy, x, s, ds):
    """dx = dy ⊙ (s + x ⊙ ds), computed in place in ``ds`` (a temporary the caller owns)."""
    ds *= x
    ds += s
    ds *= dy
    return ds


# --- GELU ------------------------------------------------------------------------------------

def _gelu_gate(x, approximate: str):
    """s(x): ½(1 + tanh(k(x + c x³))) for "tanh", Φ(x) = ½(1 + erf(x/√2)) for "none".  (...) -> (...)"""
    xp = get_xp(x)
    if approximate == "tanh":
        s = x * x  # x²
        s *= GELU_C * GELU_K
        s += GELU_K
        s *= x  # u = k x + c k x³ = k (x + c x³)   (constants folded: one pass fewer)
        xp.tanh(s, out=s)
    else:
        s = x * INV_SQRT2
        _special(xp).erf(s, out=s)  # erf(x/√2)
    s *= 0.5
    s += 0.5
    return s


def gelu_forward(x, approximate: str = "tanh"):
    """GELU, y = x · s(x).  x (...) -> y (...); cache (x, approximate).

    approximate="tanh": GPT-2's gelu_new / torch gelu(approximate="tanh");
    approximate="none": the exact erf form (BERT's "gelu").
    The cache keeps x alone and the backward recomputes the gate s(x): one extra elementwise
    pass buys back an (N, 4C) array per layer, which is most of what LoRA-FA saves elsewhere.
    """
    _check_float(x, "gelu_forward")
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"gelu_forward: approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    y = _gelu_gate(x, approximate)
    y *= x  # y = x s(x), computed in the gate's buffer
    return y, (x, approximate)


def gelu_backward(dy, cache):
    """dx (...) of y = x · s(x): dx = dy ⊙ (s + x · s')."""
    x, approximate = cache
    xp = get_xp(dy)
    if approximate == "tanh":
        # s = ½(1 + th), th = tanh(u), u = k(x + c x³)  =>  s' = ½(1 - th²) · k (1 + 3c x²), so
        # dx = dy (s + x s') = ½ dy (1 + th) (1 + (1 - th) · x k (1 + 3c x²))   (1 - th² = (1 - th)(1 + th))
        # 15 passes over (...) instead of 16 through s, in two (...) buffers instead of three:
        # th itself is recomputed, not s, then turned into a = 1 - th and 1 + th = 2 - a in place.
        v = x * x  # x²
        a = v * (GELU_C * GELU_K)
        a += GELU_K
        a *= x  # u = k x + c k x³
        xp.tanh(a, out=a)  # th
        xp.subtract(1.0, a, out=a)  # a = 1 - th
        v *= 3.0 * GELU_C * GELU_K
        v += GELU_K
        v *= x  # x k (1 + 3c x²)
        v *= a
        v += 1.0  # 1 + (1 - th) x k (1 + 3c x²)
        xp.subtract(2.0, a, out=a)  # 1 + th
        v *= a
        v *= dy
        v *= 0.5
        return v
    s = _gelu_gate(x, approximate)  # recomputed: the forward kept only x
    # s = Φ(x)  =>  s' = φ(x) = e^(-x²/2) / √(2π)
    ds = x * x  # x²
    ds *= -0.5
    xp.exp(ds, out=ds)
    ds *= INV_SQRT_2PI
    # y = x s(x)  =>  dx = dy (s + x s')
    return _gated_backward(dy, x, s, ds)


# --- SiLU ------------------------------------------------------------------------------------

def silu_forward(x):
    """SiLU (swish), y = x · σ(x).  x (...) -> y (...); cache (x, σ(x))."""
    _check_float(x, "silu_forward")
    s = sigmoid(x)  # σ(x), overflow-free
    return x * s, (x, s)


def silu_backward(dy, cache):
    """dx (...) of y = x σ(x): dx = dy ⊙ (σ + x σ (1 - σ))."""
    x, s = cache
    # s = σ(x)  =>  s' = s (1 - s)
    ds = 1.0 - s
    ds *= s
    # y = x s(x)  =>  dx = dy (s + x s')
    return _gated_backward(dy, x, s, ds)


def swiglu_forward(gate, up):
    """SwiGLU, y = silu(gate) ⊙ up = gate σ(gate) ⊙ up.  gate, up (...) -> y (...); cache (gate, up).

    σ(gate) is recomputed in the backward (one sigmoid) rather than kept: the cache is then the two
    inputs alone, (N, F) each, the same memory as caching silu's (x, σ) plus up.
    """
    _check_float(gate, "swiglu_forward")
    if up.shape != gate.shape or up.dtype != gate.dtype:
        raise ValueError(f"swiglu_forward: up must have gate's shape {tuple(gate.shape)} and dtype {gate.dtype}, "
                         f"got {tuple(up.shape)} {up.dtype}")
    y = sigmoid(gate)  # σ(g)
    y *= gate  # silu(g) = g σ(g)
    y *= up
    return y, (gate, up)


def swiglu_backward(dy, cache):
    """(dgate, dup) of y = silu(gate) ⊙ up."""
    gate, up = cache
    s = sigmoid(gate)  # σ(g), recomputed
    # y = g σ(g) u  =>  dg = dy ⊙ u ⊙ (σ + g σ (1 - σ)) = dy ⊙ u ⊙ σ (1 + g (1 - σ))
    ds = 1.0 - s
    ds *= gate
    ds += 1.0
    ds *= s  # σ (1 + g (1 - σ))
    ds *= dy
    ds *= up
    # y = silu(g) u  =>  du = dy ⊙ silu(g), in σ's buffer: two (...) buffers, the two gradients
    s *= gate
    s *= dy
    return ds, s


# --- ReLU, tanh ------------------------------------------------------------------------------

def relu_forward(x):
    """y = max(x, 0).  x (...) -> y (...); cache the boolean mask x > 0 (1 byte per element)."""
    _check_float(x, "relu_forward")
    mask = x > 0
    return x * mask, mask


def relu_backward(dy, cache):
    """y = max(x, 0)  =>  dx = dy ⊙ [x > 0]."""
    return dy * cache


def tanh_forward(x):
    """y = tanh(x) (BERT's pooler).  x (...) -> y (...); cache y (the derivative needs only y)."""
    _check_float(x, "tanh_forward")
    y = get_xp(x).tanh(x)
    return y, y


def tanh_backward(dy, cache):
    """y = tanh(x)  =>  dx = dy ⊙ (1 - y²)."""
    y = cache
    dx = y * y
    get_xp(dy).subtract(1.0, dx, out=dx)  # 1 - y²
    dx *= dy
    return dx


# --- the Hugging Face name table -------------------------------------------------------------

class Activation(NamedTuple):
    """A forward/backward pair: forward(x) -> (y, cache); backward(dy, cache) -> dx."""

    forward: object
    backward: object


def _gelu_tanh_forward(x):
    return gelu_forward(x, approximate="tanh")


def _gelu_erf_forward(x):
    return gelu_forward(x, approximate="none")


# HF config names (config.activation_function / hidden_act) -> pairs.
ACTIVATIONS: dict[str, Activation] = {
    "gelu_new": Activation(_gelu_tanh_forward, gelu_backward),  # GPT-2
    "gelu_pytorch_tanh": Activation(_gelu_tanh_forward, gelu_backward),  # the same function
    "gelu": Activation(_gelu_erf_forward, gelu_backward),  # BERT: exact erf form
    "relu": Activation(relu_forward, relu_backward),
    "silu": Activation(silu_forward, silu_backward),  # LLaMA
    "swish": Activation(silu_forward, silu_backward),
    "tanh": Activation(tanh_forward, tanh_backward),
}


def get_activation(name: str) -> Activation:
    """The (forward, backward) pair for an HF activation name; ValueError listing the known names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known names: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
