"""Quantum-PEFT with the Pauli parameterisation, real case (Koike-Akino, Tonin, Wu, Wu, Candogan,
Cevher, "Quantum-PEFT: Ultra parameter-efficient fine-tuning", ICLR 2025, arXiv 2503.05431, Sec. 4).
docs/quantum_peft.md derives every line below. The circuit's layout is reconstructed from secondary
summaries of the paper, not checked against its Sec. 4 text or the authors' code (none was found).

Shape legend: N tokens (any leading dims), d_in, d_out, r the rank, q = ⌈log₂ d⌉ qubits of a
width d, D = 2^q the padded width, L the entangling layers (``pauli_layers``).

    ΔW = s · U diag(λ) Vᵀ                  U (d_out, r), V (d_in, r), λ (r,), s = alpha / r
    y  = base(x) + s · ((x V) ⊙ λ) Uᵀ       (..., d_in) -> (..., d_out)
    U  = Q_{d_out}(θ_U) E_r, V = Q_{d_in}(θ_V) E_r, where E_r is the (d, r) matrix of the
         identity's first r columns and Q_d(θ) the d × d orthogonal matrix of the circuit below
         (real rotations only: SO(d), the paper's real-valued case), restricted to the first d
         basis states when d < D (below)

The circuit on q qubits (qubit 0 the most significant bit of a row index; RY(θ) = [[cos θ/2,
−sin θ/2], [sin θ/2, cos θ/2]] = exp(−i θ/2 · Y), a Pauli-Y rotation, real):

    1. RY on every qubit                                                      q angles
    2. L times: CZ on the pairs (0,1), (2,3), ..., then RY on each qubit of those pairs;
                CZ on the pairs (1,2), (3,4), ..., then RY on each qubit of those pairs
                                                                              2(q − 1) angles per layer
    angles of one circuit: n(q, L) = (2L + 1)·q − 2L   (the paper's Pauli count; 0 when q = 0)
    trainable parameters per adapted linear: n(q_out, L) + n(q_in, L) + r

A CZ layer is diagonal (a ±1 sign per row: −1 where both bits of an odd number of its pairs are
set), so every gate is applied to the (D, r) frame as a structured product, never as a dense
D × D matrix: RY on qubit k mixes the row pairs whose index differs in bit k,

    X viewed as (2^k, 2, 2^(q−k−1), r):  Y₀ = c X₀ − s X₁,  Y₁ = s X₀ + c X₁   (c, s = cos, sin θ/2)

costing O(D·r) per gate, O(D·r·(2L+1)·q) per circuit (the paper's O(N log N · L) at r columns).

Widths that are not powers of two (2^(q−1) < d < 2^q; the paper composes them with the quantum
Shannon decomposition, which this file does not reproduce): the circuit is restricted to the first
d basis states. CZ stays diagonal ±1; an RY on qubit k rotates only the row pairs (i, j) with both
i, j < d and is the identity on a pair that straddles d (i < d <= j) or lies above it. Every gate
is then orthogonal on R^d itself, so Q_d(θ) is a d × d orthogonal matrix and U = Q_d(θ) E_r has
orthonormal columns exactly (rows >= d of the padded frame stay 0). No angle is lost: qubit k's
pair (0, 2^(q−k−1)) is always inside, so the count stays n(⌈log₂ d⌉, L). At d = 2^q no pair is
dropped and the code is the unrestricted one, bit for bit.

Backward (the adjoint method; nothing but the output frame is cached): walking the gates from the
last to the first, each gate G is undone on both the frame and its gradient, X = Gᵀ Y and
dX = Gᵀ dY (G is orthogonal), and an RY contributes its angle's gradient from Y and dY alone:

    dY₀/dθ = −½ Y₁,  dY₁/dθ = ½ Y₀   =>   dθ = ½ Σ (dY₁ ⊙ Y₀ − dY₀ ⊙ Y₁)   (over the pairs inside d)

Init: every angle ~ U(−π, π) (a generic frame), λ = 0, so the adapted model starts equal to the
base (as LoRA's B = 0); the angles receive gradient once λ moves. Merge adds ΔW into W.
File format: there is no PEFT peer; adapter_config.json carries peft_type "QUANTUM_PEFT" and this
config's fields, adapter_model.safetensors the keys ``qpeft_U.theta``, ``qpeft_V.theta``,
``qpeft_lambda`` under PEFT's key scheme (adapters/peft_model.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from .. import validation as V
from ..backend import to_host
from ..module import Linear
from ..ops.lowrank import lowrank_backward, lowrank_forward
from .base import AdapterConfig, AdapterLayer, Recipe

THETA_U_KEY = "qpeft_U.theta"  # file-key suffixes
THETA_V_KEY = "qpeft_V.theta"
LAMBDA_KEY = "qpeft_lambda"

JSON_FIELDS = ("r", "pauli_layers", "alpha", "target_modules", "task_type")


def n_qubits(d: int) -> int:
    """q = ⌈log₂ d⌉ for a width d >= 1 (d = 1 gives 0 qubits: the frame is [1])."""
    return (int(d) - 1).bit_length()


def pauli_angle_count(q: int, layers: int) -> int:
    """n(q, L) = (2L + 1)·q − 2L angles of the circuit on q >= 1 qubits; 0 for q = 0."""
    return (2 * layers + 1) * q - 2 * layers if q > 0 else 0


def check_rank(r: int, d_out: int, d_in: int, where: str = "") -> None:
    """U and V have r orthonormal columns in widths d_out and d_in: r <= min(d_out, d_in)."""
    if r > min(d_out, d_in):
        raise ValueError(f"QuantumPeftConfig.r={r} exceeds min(d_out, d_in) = {min(d_out, d_in)}{where}; "
                         f"r orthonormal columns need r <= {min(d_out, d_in)}")


# ------------------------------------------------------------------------------------------------
# The circuit
# ------------------------------------------------------------------------------------------------
def cz_signs(q: int, pairs) -> np.ndarray:
    """The diagonal of the CZ gates on ``pairs`` of qubits: (2^q,) of ±1, host float64."""
    idx = np.arange(2**q)
    parity = np.zeros(2**q, dtype=np.int64)
    for a, b in pairs:
        parity ^= ((idx >> (q - 1 - a)) & 1) & ((idx >> (q - 1 - b)) & 1)
    return 1.0 - 2.0 * parity


class PauliCircuit:
    """Q(θ) on q qubits with L entangling layers (module docstring), applied to frames (2^q, r),
    restricted to the first ``width`` basis states (d, default 2^q; 2^(q−1) < d <= 2^q).

    ``ops`` is the gate list in application order: ("ry", qubit, angle index) or ("cz", 0 | 1),
    0 the CZs on the pairs (0,1), (2,3), ... and 1 those on (1,2), (3,4), ...
    ``inside[k]`` is None when every row pair of qubit k lies below d (always so at d = 2^q, which
    then runs the unrestricted code), else the (2^k, 2^(q−k−1), 1) 0/1 mask of the pairs (i, j)
    with j < d: an RY rotates only those, and is the identity on the others.
    """

    def __init__(self, q: int, layers: int, xp, dtype, width: int | None = None):
        self.q, self.layers, self.xp, self.dtype = q, layers, xp, dtype
        self.size = 2**q
        self.width = self.size if width is None else int(width)
        if not (self.size // 2 < self.width <= self.size or (q == 0 and self.width == 1)):
            raise ValueError(f"PauliCircuit width={self.width} needs {self.size // 2} < width <= {self.size} "
                             f"for q={q} qubits")
        even = [(a, a + 1) for a in range(0, q - 1, 2)]
        odd = [(a, a + 1) for a in range(1, q - 1, 2)]
        ops, k = [], 0
        for qubit in range(q):
            ops.append(("ry", qubit, k))
            k += 1
        for _ in range(layers):
            for which, pairs in ((0, even), (1, odd)):
                if not pairs:
                    continue
                ops.append(("cz", which))
                for a, b in pairs:
                    ops += [("ry", a, k), ("ry", b, k + 1)]
                    k += 2
        self.ops = ops
        self.n_angles = k
        assert k == pauli_angle_count(q, layers), (k, q, layers)
        self.signs = [xp.asarray(cz_signs(q, even).astype(dtype))[:, None],
                      xp.asarray(cz_signs(q, odd).astype(dtype))[:, None]]
        self.inside = [self._inside_mask(k) for k in range(q)]

    def _inside_mask(self, k):
        """Qubit k pairs row i (bit k clear) with j = i + 2^(q−k−1): the (2^k, 2^(q−k−1), 1) mask of
        j < d, or None when all are (d = 2^q). The pair (0, 2^(q−k−1)) is always inside since
        2^(q−k−1) <= 2^(q−1) < d, so every angle moves at least one pair."""
        if self.width == self.size:
            return None
        half = 2 ** (self.q - k - 1)
        j = (np.arange(2**k)[:, None] * 2 * half + half + np.arange(half)[None, :])
        return self.xp.asarray((j < self.width).astype(self.dtype))[:, :, None]

    def _cs(self, c, s, k):
        """The (c, s) of qubit k's rotation per row pair: c, s inside; 1, 0 (the identity) outside."""
        m = self.inside[k]
        if m is None:
            return c, s
        return 1 + m * (c - 1), m * s

    def _view(self, X, k):
        """X (D, r) as (2^k, 2, 2^(q−k−1), r): axis 1 is qubit k's bit."""
        return X.reshape(2**k, 2, 2 ** (self.q - k - 1), X.shape[-1])

    def forward(self, theta, r: int):
        """Q(θ) E_r: (n_angles,) -> (D, r)."""
        xp = self.xp
        X = xp.eye(self.size, r, dtype=self.dtype)  # E_r
        c, s = xp.cos(theta / 2), xp.sin(theta / 2)
        for op in self.ops:
            if op[0] == "cz":
                X = X * self.signs[op[1]]  # CZ layer: rows times ±1
            else:
                _, k, i = op
                X4 = self._view(X, k)
                x0, x1 = X4[:, 0], X4[:, 1]
                ck, sk = self._cs(c[i], s[i], k)
                X = xp.stack([ck * x0 - sk * x1, sk * x0 + ck * x1], axis=1).reshape(X.shape)
        return X

    def backward(self, dU, U, theta):
        """dθ (n_angles,) of U = Q(θ) E_r from dU (D, r) and the output frame U (D, r), gates undone
        in reverse (module docstring); U and dU are not modified."""
        xp = self.xp
        dtheta = xp.zeros(self.n_angles, dtype=self.dtype)
        c, s = xp.cos(theta / 2), xp.sin(theta / 2)
        Y, dY = U, dU
        for op in reversed(self.ops):
            if op[0] == "cz":
                sign = self.signs[op[1]]
                Y, dY = Y * sign, dY * sign  # X = CZ Y, dX = CZ dY (CZ = CZᵀ = CZ⁻¹)
                continue
            _, k, i = op
            Y4, dY4 = self._view(Y, k), self._view(dY, k)
            y0, y1, g0, g1 = Y4[:, 0], Y4[:, 1], dY4[:, 0], dY4[:, 1]
            m = self.inside[k]
            # Y₀ = c X₀ − s X₁, Y₁ = s X₀ + c X₁ on the pairs inside d  =>  dθ = ½ Σ m ⊙ (dY₁ ⊙ Y₀ − dY₀ ⊙ Y₁)
            if m is None:
                dtheta[i] = 0.5 * (xp.sum(g1 * y0) - xp.sum(g0 * y1))
            else:
                dtheta[i] = 0.5 * (xp.sum(m * g1 * y0) - xp.sum(m * g0 * y1))
            # X = Gᵀ Y, dX = Gᵀ dY:  X₀ = c Y₀ + s Y₁, X₁ = −s Y₀ + c Y₁ (c, s = 1, 0 outside d)
            ck, sk = self._cs(c[i], s[i], k)
            Y = xp.stack([ck * y0 + sk * y1, ck * y1 - sk * y0], axis=1).reshape(Y.shape)
            dY = xp.stack([ck * g0 + sk * g1, ck * g1 - sk * g0], axis=1).reshape(dY.shape)
        return dtheta


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
@dataclass
class QuantumPeftConfig(AdapterConfig):
    """Quantum-PEFT (Pauli parameterisation) hyper-parameters; validated at construction."""

    peft_type: ClassVar[str] = "QUANTUM_PEFT"

    r: int = 8  # the rank: columns of U and V, entries of λ
    pauli_layers: int = 1  # L, the entangling layers of each circuit (the paper's L)
    alpha: float = 8  # scaling numerator: s = alpha / r (as LoRA's lora_alpha)
    target_modules: str | list[str] | None = None  # names or a regex (PEFT's rule)
    task_type: str | None = None  # carried through the file

    def __post_init__(self):
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        self.validate()

    def validate(self) -> None:
        n = self.name
        self.check_target_modules()
        V.check_int(n, "r", self.r, min=1)
        V.check_int(n, "pauli_layers", self.pauli_layers, min=1)
        V.check_float(n, "alpha", self.alpha, min=0, min_inclusive=False)
        V.check_optional_str(n, "task_type", self.task_type)

    def make_layer(self, path: str, base: Linear, rng) -> QuantumPeftLinear:
        return QuantumPeftLinear(base, r=self.r, pauli_layers=self.pauli_layers, alpha=self.alpha, rng=rng, path=path)

    def layer_parameter_count(self, d_out: int, d_in: int) -> int:
        """n(⌈log₂ d_out⌉, L) + n(⌈log₂ d_in⌉, L) + r for one (d_out, d_in) linear."""
        check_rank(self.r, d_out, d_in)
        L = self.pauli_layers
        return pauli_angle_count(n_qubits(d_out), L) + pauli_angle_count(n_qubits(d_in), L) + self.r

    def parameter_count(self, shapes: dict[str, tuple[int, int]]) -> int:
        return int(sum(self.layer_parameter_count(d_out, d_in) for d_out, d_in in shapes.values()))

    @classmethod
    def for_run(cls, options, size) -> QuantumPeftConfig:
        """The main job's config: rank ``size`` (the run's r, LoRA's rank beside it), one layer,
        alpha = the run's lora_alpha."""
        return cls(r=int(size), pauli_layers=1, alpha=options.lora_alpha, target_modules=options.target_list())

    def to_json_dict(self, peft_model=None) -> dict:
        tm = self.target_modules
        return {"peft_type": self.peft_type, "task_type": self.task_type, "inference_mode": True,
                "base_model_name_or_path": None, "revision": None, "r": self.r,
                "pauli_layers": self.pauli_layers, "alpha": self.alpha,
                "target_modules": tm if isinstance(tm, str) else list(tm)}

    @classmethod
    def from_json_dict(cls, d: dict) -> QuantumPeftConfig:
        if str(d.get("peft_type", "")).upper() != cls.peft_type:
            raise ValueError(f"adapter_config.json peft_type is {d.get('peft_type')!r}, expected {cls.peft_type!r}")
        names = {f.name for f in fields(cls)} & set(JSON_FIELDS)
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------
class QuantumPeftLinear(AdapterLayer):
    """y = base(x) + s · ((x V) ⊙ λ) Uᵀ with U, V from Pauli circuits (module docstring).

    Params: ``qpeft_U.theta`` (n(q_out, L),), ``qpeft_V.theta`` (n(q_in, L),), ``qpeft_lambda`` (r,).
    Cache: the low-rank cache of x ↦ s·(x Aᵀ)Bᵀ with A = diag(λ) Vᵀ (r, d_in), B = U (the input
    (N, d_in) and x Aᵀ (N, r)), and the two padded frames (D_out, r), (D_in, r) the circuits'
    backward starts from.
    """

    def __init__(self, base: Linear, r: int, pauli_layers: int = 1, alpha: float = 8, rng=None, path: str = ""):
        where = f" (module {path!r})" if path else ""
        if not isinstance(base, Linear):
            raise TypeError(f"Quantum-PEFT wraps a Linear{where}, got {type(base).__name__}")
        V.check_int("QuantumPeftLinear", "r", r, min=1)
        V.check_int("QuantumPeftLinear", "pauli_layers", pauli_layers, min=1)
        check_rank(r, base.d_out, base.d_in, where)
        if rng is None:
            raise ValueError("Quantum-PEFT needs rng, the host numpy Generator initial angles are drawn from")
        super().__init__(base)
        self.r, self.pauli_layers, self.alpha = r, pauli_layers, alpha
        self.scaling = alpha / r
        xp, dtype = base.xp, base.dtype
        self.circuit_U = PauliCircuit(n_qubits(base.d_out), pauli_layers, xp, dtype, width=base.d_out)
        self.circuit_V = PauliCircuit(n_qubits(base.d_in), pauli_layers, xp, dtype, width=base.d_in)
        theta_U = rng.uniform(-math.pi, math.pi, size=self.circuit_U.n_angles)  # θ_U drawn first, then θ_V
        theta_V = rng.uniform(-math.pi, math.pi, size=self.circuit_V.n_angles)
        self.params[THETA_U_KEY] = xp.asarray(theta_U.astype(dtype))
        self.params[THETA_V_KEY] = xp.asarray(theta_V.astype(dtype))
        self.params[LAMBDA_KEY] = xp.zeros(r, dtype=dtype)

    def adapter_parameter_count(self) -> int:
        return self.circuit_U.n_angles + self.circuit_V.n_angles + self.r

    def frames(self):
        """(U (d_out, r), V (d_in, r), U padded (D_out, r), V padded (D_in, r)); the padded rows
        past d are exactly 0 (the circuit is restricted to the first d basis states)."""
        p = self.params
        Uf = self.circuit_U.forward(p[THETA_U_KEY], self.r)
        Vf = self.circuit_V.forward(p[THETA_V_KEY], self.r)
        return Uf[: self.d_out], Vf[: self.d_in], Uf, Vf

    def delta_weight(self):
        """ΔW = s · U diag(λ) Vᵀ   (d_out, r) @ (r, d_in) -> (d_out, d_in)."""
        U, V_, _, _ = self.frames()
        return self.scaling * ((U * self.params[LAMBDA_KEY]) @ V_.T)

    def forward(self, x):
        if x.shape[-1] != self.d_in:
            raise ValueError(f"{type(self).__name__} expects inputs (..., {self.d_in}), got {x.shape}")
        if self.merged:
            return self.base_layer.forward(x)
        U, V_, Uf, Vf = self.frames()
        A = self.params[LAMBDA_KEY][:, None] * V_.T  # A = diag(λ) Vᵀ  (r, d_in)
        y = self.base_layer.forward(x)
        yb, lcache = lowrank_forward(x, A, U, self.scaling, keep_x=True)
        y += yb  # y = base(x) + s · (x Aᵀ) Uᵀ
        self.cache = (lcache, A, U, V_, Uf, Vf)
        return y

    def backward(self, dy):
        if self.merged:
            return self.base_layer.backward(dy)
        lcache, A, U, V_, Uf, Vf = self.cache
        p, xp, fr = self.params, self.xp, self.frozen
        need_V, need_U = THETA_V_KEY not in fr, THETA_U_KEY not in fr
        need_A = need_V or LAMBDA_KEY not in fr
        dx_b, dA, dB = lowrank_backward(dy, lcache, A, U, self.scaling, need_dA=need_A, need_dB=need_U)
        if LAMBDA_KEY not in fr:
            # A = diag(λ) Vᵀ  =>  dλ_k = Σ_j dA_kj V_jk
            self.accumulate(LAMBDA_KEY, xp.einsum("kj,jk->k", dA, V_))
        if need_V:
            # A = diag(λ) Vᵀ  =>  dV = (diag(λ) dA)ᵀ (d_in, r); rows past d_in (the padding) get 0
            dVf = xp.zeros_like(Vf)
            dVf[: self.d_in] = (p[LAMBDA_KEY][:, None] * dA).T
            self.accumulate(THETA_V_KEY, self.circuit_V.backward(dVf, Vf, p[THETA_V_KEY]))
        if need_U:
            # B = U (the first d_out rows of the padded frame; the rest are 0)
            dUf = xp.zeros_like(Uf)
            dUf[: self.d_out] = dB
            self.accumulate(THETA_U_KEY, self.circuit_U.backward(dUf, Uf, p[THETA_U_KEY]))
        dx = self.base_layer.backward(dy)  # y = base(x)  =>  dx = base'(dy)
        dx += dx_b
        self.cache = None
        return dx

    # --- adapter file ------------------------------------------------------------------------------
    def peft_state_dict(self) -> dict:
        return {k: self.params[k] for k in (THETA_U_KEY, THETA_V_KEY, LAMBDA_KEY)}

    def load_peft_state_dict(self, arrays: dict) -> None:
        """Install arrays read from an adapter file; every key and shape checked first."""
        want = {k: tuple(v.shape) for k, v in self.peft_state_dict().items()}
        if set(arrays) != set(want):
            raise KeyError(f"adapter arrays {sorted(arrays)} do not match this layer's {sorted(want)}")
        for k, shape in want.items():
            if tuple(arrays[k].shape) != shape:
                raise ValueError(f"{k} has shape {tuple(arrays[k].shape)}, this layer needs {shape}")
        if self.merged:
            raise RuntimeError("cannot load adapter arrays into a merged layer; unmerge() first")
        for k in want:
            self.params[k] = self.xp.asarray(to_host(arrays[k]).astype(self.dtype))
        self.grads = {}


RECIPES = (Recipe("quantum_peft", "Quantum-PEFT", lambda options, r: QuantumPeftConfig.for_run(options, r),
                  preset="r", own_budget=True),)
