"""Quantum-PEFT (Pauli parameterisation): the circuit against a dense Kronecker-product reference,
float64 central differences for every angle and λ, PyTorch autograd parity (circuit and layer),
orthogonality after AdamW steps, the paper's parameter count, bad input, merge and the adapter file.
Widths that are not powers of two are checked against a second dense reference: the circuit as
d × d Givens rotations on the row pairs below d (built from index arithmetic, not from the code).

Tolerances (float64): structured circuit vs the dense reference 1e-12 absolute; torch parity 1e-10
relative to the largest gradient; central differences GRADCHECK_RTOL (1e-6); orthogonality 1e-12.
"""
import json
from functools import reduce

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.adapters.peft_model import adapted_shapes, get_peft_model, load_peft_model
from spectral_peft.adapters.quantum_peft import (LAMBDA_KEY, THETA_U_KEY, THETA_V_KEY, PauliCircuit,
                                                 QuantumPeftConfig, QuantumPeftLinear)
from spectral_peft.adapters.registry import config_class, recipe
from spectral_peft.backend import get_backend
from spectral_peft.commands.run_options import RunConfig
from spectral_peft.model import GPT2Config, GPT2LMHeadModel
from spectral_peft.module import Linear
from spectral_peft.optim import AdamW
from spectral_peft.testing import GRADCHECK_RTOL, assert_close, check_module_gradients

B64 = get_backend("cpu", "float64")


# --- an independent dense reference: every gate a 2^q × 2^q Kronecker product ---------------------
def dense_gates(q, L, lib):
    """The circuit as a list of (kind, qubit or pairs, angle index), built from the paper's description
    (RY on every qubit; per layer CZ on even pairs then RY on their qubits, CZ on odd pairs then RY)."""
    gates, k = [("ry", j, j) for j in range(q)], q
    for _ in range(L):
        for start in (0, 1):
            pairs = [(a, a + 1) for a in range(start, q - 1, 2)]
            if pairs:
                gates.append(("cz", pairs, None))
                for a, b in pairs:
                    gates += [("ry", a, k), ("ry", b, k + 1)]
                    k += 2
    return gates, k


def dense_Q(theta, q, L, lib=np):
    """Q(θ) = Π G_k (last gate leftmost), each G_k = I ⊗ ... ⊗ g ⊗ ... ⊗ I materialised densely."""
    gates, _ = dense_gates(q, L, lib)
    eye2 = lib.eye(2, dtype=lib.float64)
    Z = lib.tensor([1.0, -1.0], dtype=lib.float64) if lib is torch else np.array([1.0, -1.0])
    Q = lib.eye(2**q, dtype=lib.float64)
    for kind, where, i in gates:
        if kind == "ry":
            c, s = lib.cos(theta[i] / 2), lib.sin(theta[i] / 2)
            g = lib.stack([lib.stack([c, -s]), lib.stack([s, c])])
            G = reduce(lib.kron, [g if j == where else eye2 for j in range(q)])
        else:  # CZ on each pair: diag(1, 1, 1, −1) on the two qubits
            diag = lib.ones(2**q, dtype=lib.float64)
            for a, b in where:
                za = reduce(lib.kron, [(Z if j == a else lib.ones(2, dtype=lib.float64)) for j in range(q)])
                zb = reduce(lib.kron, [(Z if j == b else lib.ones(2, dtype=lib.float64)) for j in range(q)])
                diag = diag * (1 + za + zb - za * zb) / 2  # CZ eigenvalue: −1 only when both bits are 1
            G = lib.diag(diag)
        Q = G @ Q
    return Q


def givens_Q(theta, d, L, lib=np):
    """Q_d(θ) (d, d) for any width d: each RY on qubit k a d × d Givens matrix rotating the row pairs
    (i, i + 2^(q−k−1)) with bit k of i clear and both below d (identity elsewhere); each CZ layer the
    diagonal of −1 where an odd number of its pairs have both bits set, on rows 0..d−1."""
    q = (d - 1).bit_length()
    gates, _ = dense_gates(q, L, lib)
    Q = lib.eye(d, dtype=lib.float64)
    for kind, where, i in gates:
        if kind == "ry":
            c, s = lib.cos(theta[i] / 2), lib.sin(theta[i] / 2)
            half = 2 ** (q - 1 - where)
            rows = []
            for a in range(d):
                row = [lib.zeros((), dtype=lib.float64) for _ in range(d)]
                if (a // half) % 2 == 0 and a + half < d:  # a is the pair's first row
                    row[a], row[a + half] = c, -s
                elif (a // half) % 2 == 1:  # a is the second row of the pair (a − half, a)
                    row[a - half], row[a] = s, c
                else:  # the partner is at or past d: identity
                    row[a] = lib.ones((), dtype=lib.float64)
                rows.append(lib.stack(row))
            G = lib.stack(rows)
        else:
            sign = []
            for a in range(d):
                bits = [(a >> (q - 1 - j)) & 1 for j in range(q)]
                sign.append(-1.0 if sum(bits[x] & bits[y] for x, y in where) % 2 else 1.0)
            G = lib.diag(lib.tensor(sign, dtype=lib.float64) if lib is torch else np.array(sign))
        Q = G @ Q
    return Q


def make_layer(d_in, d_out, r, L=1, seed=0, alpha=2.0):
    rng = np.random.default_rng(seed)
    base = Linear(B64.asarray(rng.standard_normal((d_out, d_in))), B64.asarray(rng.standard_normal(d_out)))
    base.freeze()
    layer = QuantumPeftLinear(base, r=r, pauli_layers=L, alpha=alpha, rng=np.random.default_rng(seed + 1))
    layer.params[LAMBDA_KEY] = rng.standard_normal(r)  # λ ≠ 0, so every angle has a gradient
    return layer


def gpt2(n_embd=16, n_layer=2, seed=0):
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=2)
    return GPT2LMHeadModel(cfg, B64, seed=seed)


# --- the circuit --------------------------------------------------------------------------------------
@pytest.mark.parametrize("q,L", [(1, 1), (2, 1), (3, 2), (4, 1), (5, 3)])
def test_structured_circuit_equals_the_dense_kronecker_product(q, L):
    circ = PauliCircuit(q, L, np, np.float64)
    theta = np.random.default_rng(q + L).uniform(-np.pi, np.pi, circ.n_angles)
    Q = dense_Q(theta, q, L)
    assert_close(Q.T @ Q, np.eye(2**q), "QᵀQ (dense reference)", 0, atol=1e-12)
    for r in (1, 2**q):
        assert_close(circ.forward(theta, r), Q[:, :r], f"Q E_{r}", 0, atol=1e-12)


@pytest.mark.parametrize("q", range(1, 8))
@pytest.mark.parametrize("L", [1, 2, 4])
def test_angle_count_is_the_papers_formula(q, L):
    """(2L + 1)·q − 2L (the paper's Pauli count) = q initial RYs + 2 per CZ pair, (q − 1) pairs a layer."""
    assert PauliCircuit(q, L, np, np.float64).n_angles == (2 * L + 1) * q - 2 * L
    assert dense_gates(q, L, np)[1] == q + L * 2 * (q - 1)


@pytest.mark.parametrize("q,L,r", [(2, 1, 3), (3, 2, 2), (4, 2, 5)])
def test_circuit_backward_matches_torch_autograd(q, L, r):
    circ = PauliCircuit(q, L, np, np.float64)
    rng = np.random.default_rng(7)
    theta = rng.uniform(-np.pi, np.pi, circ.n_angles)
    G = rng.standard_normal((2**q, r))
    t = torch.tensor(theta, requires_grad=True)
    U_t = dense_Q(t, q, L, torch)[:, :r]
    (U_t * torch.tensor(G)).sum().backward()
    U = circ.forward(theta, r)
    dtheta = circ.backward(G, U, theta)
    assert_close(dtheta, t.grad.numpy(), "dθ vs torch", 1e-10, atol=1e-10 * np.abs(t.grad.numpy()).max())


PADDED = [3, 5, 6, 7, 12]  # widths that are not powers of two (384 checked on the layer below)


@pytest.mark.parametrize("q,L", [(1, 1), (2, 2), (3, 1), (4, 2)])
def test_givens_reference_equals_the_kronecker_product_at_powers_of_two(q, L):
    """The second reference is the first one at d = 2^q, so it describes the same circuit."""
    theta = np.random.default_rng(11 * q + L).uniform(-np.pi, np.pi, dense_gates(q, L, np)[1])
    assert_close(givens_Q(theta, 2**q, L), dense_Q(theta, q, L), "Givens Q vs Kronecker Q", 0, atol=1e-12)


@pytest.mark.parametrize("d", PADDED)
@pytest.mark.parametrize("L", [1, 3])
def test_circuit_at_other_widths_is_exactly_orthogonal_on_its_width(d, L):
    q = (d - 1).bit_length()
    circ = PauliCircuit(q, L, np, np.float64, width=d)
    theta = np.random.default_rng(d + 10 * L).uniform(-np.pi, np.pi, circ.n_angles)
    Qd = givens_Q(theta, d, L)
    assert_close(Qd.T @ Qd, np.eye(d), f"Q_{d}ᵀQ_{d} (Givens reference)", 0, atol=1e-12)
    for r in (1, d):
        X = circ.forward(theta, r)
        assert X.shape == (2**q, r) and not X[d:].any(), "padded rows past d must stay exactly 0"
        assert_close(X[:d], Qd[:, :r], f"Q_{d} E_{r}", 0, atol=1e-12)
        assert_close(X[:d].T @ X[:d], np.eye(r), f"UᵀU at d={d}", 0, atol=1e-12)


def test_power_of_two_width_runs_the_unrestricted_circuit_bit_for_bit():
    theta = np.random.default_rng(1).uniform(-np.pi, np.pi, PauliCircuit(4, 2, np, np.float64).n_angles)
    full = PauliCircuit(4, 2, np, np.float64, width=16)
    assert all(m is None for m in full.inside)
    assert np.array_equal(full.forward(theta, 3), PauliCircuit(4, 2, np, np.float64).forward(theta, 3))
    with pytest.raises(ValueError, match=r"width=8 needs 8 < width <= 16"):
        PauliCircuit(4, 1, np, np.float64, width=8)


@pytest.mark.parametrize("d,L,r", [(3, 1, 2), (5, 2, 3), (6, 1, 6), (12, 2, 4)])
def test_restricted_circuit_backward_matches_torch_autograd(d, L, r):
    q = (d - 1).bit_length()
    circ = PauliCircuit(q, L, np, np.float64, width=d)
    rng = np.random.default_rng(d)
    theta = rng.uniform(-np.pi, np.pi, circ.n_angles)
    G = np.zeros((2**q, r))
    G[:d] = rng.standard_normal((d, r))  # the layer pads dU with zero rows past d
    t = torch.tensor(theta, requires_grad=True)
    (givens_Q(t, d, L, torch)[:, :r] * torch.tensor(G[:d])).sum().backward()
    dtheta = circ.backward(G, circ.forward(theta, r), theta)
    assert_close(dtheta, t.grad.numpy(), f"dθ vs torch at d={d}", 1e-10, atol=1e-10 * np.abs(t.grad.numpy()).max())


# --- the layer ----------------------------------------------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(d_in=st.integers(1, 9), d_out=st.integers(1, 9), L=st.integers(1, 3), n=st.integers(1, 3),
       data=st.data(), seed=st.integers(0, 2**16))
def test_layer_gradients_match_central_differences(d_in, d_out, L, n, data, seed):
    """Every angle of both circuits, λ and the input, powers of two and padded widths alike."""
    r = data.draw(st.integers(1, min(d_in, d_out)))
    layer = make_layer(d_in, d_out, r, L, seed)
    x = np.random.default_rng(seed + 2).standard_normal((n, d_in))
    check_module_gradients(layer, [x], seed=seed, rtol=GRADCHECK_RTOL)


@pytest.mark.parametrize("d_in,d_out,r,L", [(12, 6, 3, 2), (5, 384, 2, 1)])
def test_layer_gradients_match_central_differences_at_wider_padded_widths(d_in, d_out, r, L):
    layer = make_layer(d_in, d_out, r, L, seed=d_out)
    x = np.random.default_rng(1).standard_normal((2, d_in))
    check_module_gradients(layer, [x], seed=2, rtol=GRADCHECK_RTOL)


@pytest.mark.parametrize("d_in,d_out,r,L", [(8, 16, 3, 2), (6, 5, 2, 1), (4, 4, 4, 3), (12, 3, 3, 2)])
def test_layer_matches_torch_autograd(d_in, d_out, r, L):
    layer = make_layer(d_in, d_out, r, L, seed=3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, d_in))
    G = rng.standard_normal((2, 3, d_out))
    p = layer.params
    y = layer.forward(x)
    layer.zero_grad()
    dx = layer.backward(G.copy())

    W, b = (torch.tensor(layer.base_layer.params[k]) for k in ("weight", "bias"))
    tu, tv, tl, tx = (torch.tensor(a, requires_grad=True) for a in (p[THETA_U_KEY], p[THETA_V_KEY], p[LAMBDA_KEY], x))
    U = givens_Q(tu, d_out, L, torch)[:, :r]
    V = givens_Q(tv, d_in, L, torch)[:, :r]
    ty = tx @ W.T + b + layer.scaling * ((tx @ V) * tl) @ U.T
    ty.backward(torch.tensor(G))
    assert_close(y, ty.detach().numpy(), "y vs torch", 1e-12)
    for name, ours, theirs in (("dx", dx, tx.grad), ("dθ_U", layer.grads[THETA_U_KEY], tu.grad),
                               ("dθ_V", layer.grads[THETA_V_KEY], tv.grad), ("dλ", layer.grads[LAMBDA_KEY], tl.grad)):
        t = theirs.numpy()
        assert_close(ours, t, f"{name} vs torch", 1e-10, atol=1e-10 * np.abs(t).max())


def test_init_is_the_base_and_merge_adds_the_delta():
    layer = make_layer(8, 16, 3, seed=5)
    x = np.random.default_rng(6).standard_normal((4, 8))
    fresh = QuantumPeftLinear(layer.base_layer, r=3, rng=np.random.default_rng(0))
    assert not fresh.params[LAMBDA_KEY].any()
    assert_close(fresh.forward(x), layer.base_layer.forward(x), "y at init vs base", 0, atol=0)
    y = layer.forward(x)
    W0 = layer.base_layer.params["weight"].copy()
    layer.merge()
    assert_close(layer.forward(x), y, "merged y", 1e-12)
    layer.unmerge()
    assert_close(layer.base_layer.params["weight"], W0, "W after unmerge", 1e-12)


@settings(max_examples=6, deadline=None)
@given(steps=st.integers(1, 25), lr=st.sampled_from([1e-3, 0.1, 1.0]), seed=st.integers(0, 2**16),
       widths=st.sampled_from([(8, 16), (3, 5), (6, 12), (5, 6), (384, 12), (7, 384)]), L=st.integers(1, 2))
def test_frames_stay_orthonormal_after_adamw_steps(steps, lr, seed, widths, L):
    """U and V have orthonormal columns to 1e-12 after any number of AdamW steps at any learning
    rate, at powers of two and at the widths 3, 5, 6, 7, 12, 384 alike."""
    rng = np.random.default_rng(seed)
    d_in, d_out = widths
    r = min(3, d_in, d_out)
    m = make_layer(d_in, d_out, r, L=L, seed=seed)
    opt = AdamW(m, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    theta0 = m.params[THETA_U_KEY].copy()
    for _ in range(steps):
        x = rng.standard_normal((5, m.d_in))
        m.forward(x)
        m.zero_grad()
        m.backward(rng.standard_normal((5, m.d_out)))
        opt.step()
    assert not np.array_equal(m.params[THETA_U_KEY], theta0), "the angles must have moved"
    U, V, Uf, Vf = m.frames()
    assert_close(U.T @ U, np.eye(r), f"UᵀU (d_out={d_out})", 0, atol=1e-12)
    assert_close(V.T @ V, np.eye(r), f"VᵀV (d_in={d_in})", 0, atol=1e-12)
    assert not Uf[d_out:].any() and not Vf[d_in:].any(), "padded rows past d must stay exactly 0"


# --- config, count, registry, file ---------------------------------------------------------------------
def test_parameter_count_is_the_formula_and_the_built_count():
    """GPT-2 C = 16: c_attn (48, 16), c_proj (16, 16), c_fc (64, 16), mlp c_proj (16, 64); q = 6, 4, 4, 6, 4.
    Per circuit (2L + 1)·q − 2L at L = 2: q = 4 -> 16, q = 6 -> 26."""
    conf = QuantumPeftConfig(r=3, pauli_layers=2, target_modules=["c_attn", "c_proj", "c_fc"])
    base = gpt2()
    shapes = adapted_shapes(base, conf.target_modules)
    per_block = (26 + 16 + 3) + (16 + 16 + 3) + (26 + 16 + 3) + (16 + 26 + 3)
    assert conf.parameter_count(shapes) == 2 * per_block
    peft = get_peft_model(base, conf)
    assert peft.trainable_parameter_count() == peft.num_parameters(trainable_only=True) == 2 * per_block


@pytest.mark.parametrize("kw,match", [
    (dict(r=0), r"r"), (dict(pauli_layers=0), r"pauli_layers"), (dict(alpha=0.0), r"alpha"),
    (dict(target_modules=None), r"target_modules is None"), (dict(r=2.5), r"r"),
])
def test_bad_config_is_refused_at_construction(kw, match):
    values = dict(r=2, target_modules=["c_attn"])
    values.update(kw)
    with pytest.raises(ValueError, match=match):
        QuantumPeftConfig(**values)


def test_rank_above_the_width_is_refused_before_the_model_changes():
    base = gpt2()
    before = [p for p, _ in base.named_modules()]
    conf = QuantumPeftConfig(r=17, target_modules=["c_proj"])
    with pytest.raises(ValueError, match=r"r=17 exceeds min\(d_out, d_in\) = 16"):
        conf.parameter_count(adapted_shapes(base, ["c_proj"]))
    with pytest.raises(ValueError, match=r"r=17 exceeds min\(d_out, d_in\) = 16 \(module 'transformer.h.0.attn.c_proj'\)"):
        get_peft_model(base, conf)
    assert [p for p, _ in base.named_modules()] == before and not base.frozen


def test_adapter_file_round_trips(tmp_path):
    conf = QuantumPeftConfig(r=2, pauli_layers=2, alpha=4.0, target_modules=["c_attn", "c_fc"])
    peft = get_peft_model(gpt2(seed=1), conf, seed=3)
    rng = np.random.default_rng(0)
    for _, layer in peft.adapter_layers():
        layer.params[LAMBDA_KEY] = rng.standard_normal(2)
    peft.eval()
    ids = np.arange(12).reshape(2, 6) % 32
    logits = peft.forward(ids).logits.copy()
    peft.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "QUANTUM_PEFT" and saved["pauli_layers"] == 2 and saved["r"] == 2
    assert config_class("quantum_peft") is QuantumPeftConfig
    reloaded = load_peft_model(gpt2(seed=1), tmp_path / "a", seed=99)  # another seed: the file holds every value
    reloaded.eval()
    assert_close(reloaded.forward(ids).logits, logits, "reloaded logits", 1e-12)
    assert QuantumPeftConfig.from_json_dict(saved) == conf


def test_recipe_runs_at_the_runs_rank_beside_lora():
    rec = recipe("quantum_peft")
    opts = RunConfig(r=4, target_modules="c_attn,c_proj,c_fc")
    conf = rec.make_config(opts, opts.r)
    assert rec.own_budget and rec.preset == "r" and conf.r == 4 and conf.alpha == opts.lora_alpha
