"""Pruning of the frozen base (spectral_peft.prune, docs/pruning.md): exact sparsity of every mask,
Wanda's scores against NumPy, the sparse layers' forward/backward (central differences, float64),
LoRA and QLoRA on a pruned base, bytes, merging."""
import math
import os
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.adapters.lora import LoraConfig
from spectral_peft.adapters.peft_model import get_peft_model
from spectral_peft.module import Linear
from spectral_peft.prune import (NMSparseLinear, SparseLinear, activation_norms, magnitude_mask, merge_and_unload_pruned,
                                 merge_pruned, method_tag, nm_mask, off_support_fraction, parse_prune_method,
                                 prune_model, wanda_mask, wanda_scores)
from spectral_peft.quant import frozen_weight_bytes, quantize_model
from spectral_peft.testing import assert_close, check_module_gradients
from tests._nets import TwoLinear

SPARSITY = st.sampled_from([0.0, 0.1, 0.25, 0.29, 0.3, 0.5, 0.7, 0.9, 0.99])


def _expected_k(n, s):
    """⌊s·n⌋ in exact rational arithmetic (the decimal s as written)."""
    return math.floor(Fraction(str(s)) * n)


# --- exact sparsity (property tests) ----------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(1, 9), d_in=st.integers(1, 13), s=SPARSITY, seed=st.integers(0, 2**16))
def test_magnitude_mask_prunes_exactly_and_the_smallest(d_out, d_in, s, seed):
    W = np.random.default_rng(seed).standard_normal((d_out, d_in))
    keep = magnitude_mask(W, s)
    k = _expected_k(W.size, s)
    assert int((~keep).sum()) == k
    pruned_W = np.where(keep, W, 0.0)
    assert int((pruned_W == 0).sum()) == k  # a Gaussian W has no zero of its own
    if 0 < k < W.size:
        assert np.abs(W[~keep]).max() <= np.abs(W[keep]).min()


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(1, 8), d_in=st.integers(1, 16), s=SPARSITY, seed=st.integers(0, 2**16))
def test_wanda_mask_prunes_exactly_per_row_and_the_lowest_scores(d_out, d_in, s, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_out, d_in))
    a = np.abs(rng.standard_normal(d_in)) + 0.1
    keep = wanda_mask(W, a, s)
    k = _expected_k(d_in, s)
    assert ((~keep).sum(axis=1) == k).all()
    S = np.abs(W) * a  # independent formula
    for i in range(d_out):
        expected = set(np.argsort(S[i])[:k].tolist())  # distinct random scores: no ties
        assert set(np.flatnonzero(~keep[i]).tolist()) == expected


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(1, 6), groups=st.integers(1, 5), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8)]),
       seed=st.integers(0, 2**16))
def test_nm_mask_keeps_exactly_n_of_every_m_the_largest(d_out, groups, nm, seed):
    n, m = nm
    W = np.random.default_rng(seed).standard_normal((d_out, groups * m))
    keep = nm_mask(np.abs(W), n, m)
    g = keep.reshape(d_out, groups, m)
    assert (g.sum(axis=2) == n).all()
    A = np.abs(W).reshape(d_out, groups, m)
    kept_min = np.where(g, A, np.inf).min(axis=2)
    pruned_max = np.where(g, -np.inf, A).max(axis=2)
    assert (pruned_max <= kept_min).all()
    layer = NMSparseLinear.from_linear(Linear(W), keep, n, m)
    assert np.array_equal(layer.mask(), keep)
    assert np.array_equal(layer.effective_weight(), np.where(keep, W, 0.0))


def test_magnitude_matches_torch_l1_unstructured():
    torch = pytest.importorskip("torch")
    from torch.nn.utils import prune as tprune  # noqa: PLC0415
    W = np.random.default_rng(3).standard_normal((12, 20)).astype(np.float32)
    lin = torch.nn.Linear(20, 12, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W))
    tprune.l1_unstructured(lin, "weight", amount=int(0.6 * W.size))
    assert np.array_equal(magnitude_mask(W, 0.6), lin.weight_mask.numpy().astype(bool))


# --- Wanda's scores and calibration ------------------------------------------------------------------
def test_wanda_scores_and_activation_norms_against_numpy():
    rng = np.random.default_rng(0)
    model = TwoLinear(seed=1)
    X = rng.standard_normal((7, 5))
    m = TwoLinear(seed=1)
    norms = activation_norms(m, [{"x": X[:3]}, {"x": X[3:]}])  # model.forward(**batch), two batches
    Wa, Wb = model.a.params["weight"], model.b.params["weight"]
    H = X @ Wa.T  # the input of b
    assert_close(norms["a"], np.sqrt((X ** 2).sum(axis=0)), "a_norm(a)", rtol=1e-12)
    assert_close(norms["b"], np.linalg.norm(H, axis=0), "a_norm(b)", rtol=1e-12)
    S = wanda_scores(Wb, norms["b"])
    expected = np.array([[abs(Wb[i, j]) * math.sqrt(sum(H[n, j] ** 2 for n in range(7))) for j in range(6)]
                         for i in range(4)])
    assert_close(S, expected, "wanda scores", rtol=1e-12)
    assert type(m.a) is Linear and type(m.b) is Linear  # the recorders are gone


# --- the pruned layers ----------------------------------------------------------------------------
KINDS = ["csr", "csr-dense", "nm"]  # CSR with the sparse products, CSR computed densely, 2:4 packed


def _pruned(kind, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((6, 8))
    b = rng.standard_normal(6) if bias else None
    lin = Linear(W, b)
    if kind.startswith("csr"):
        return SparseLinear.from_linear(lin, magnitude_mask(W, 0.5), "dense" if kind == "csr-dense" else "spmm"), W
    return NMSparseLinear.from_linear(lin, nm_mask(np.abs(W), 2, 4), 2, 4), W


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_forward_equals_masked_dense(kind):
    layer, W = _pruned(kind)
    Wp = np.where(layer.mask(), W, 0.0)
    x = np.random.default_rng(1).standard_normal((2, 3, 8))
    assert_close(layer.forward(x), x @ Wp.T + layer.params["bias"], f"{kind} y", rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_backward_central_differences(kind):
    layer, _ = _pruned(kind)
    check_module_gradients(layer, [np.random.default_rng(2).standard_normal((5, 8))], seed=3)  # dx and db
    layer.freeze("bias")
    check_module_gradients(layer, [np.random.default_rng(2).standard_normal((5, 8))], seed=4)  # dx alone


@pytest.mark.parametrize("kind", ["csr", "nm"])
def test_lora_on_pruned_base_central_differences(kind):
    model = TwoLinear(seed=5)
    if kind == "csr":
        prune_model(model, "magnitude", 0.5)
    else:  # N:M needs d_in % M == 0: b (d_in 6) at 1:2, a (d_in 5) stays dense
        prune_model(model, "magnitude", nm=(1, 2), target_modules=["b"])
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"]), seed=0)
    rng = np.random.default_rng(6)
    for _, m, k in peft.named_parameters(trainable_only=True):  # B starts at zero: move it off
        m.params[k][...] = rng.standard_normal(m.params[k].shape)
    check_module_gradients(peft.model, [rng.standard_normal((4, 5))], seed=7)


def test_weight_bytes_and_frozen_bytes():
    layer, _ = _pruned("csr")  # 48 weights, 24 kept, float64
    assert layer.weight_bytes() == 24 * 8 + 7 * 4 + 24 * 4
    nm, _ = _pruned("nm")  # 2:4: 4 values per row of 8
    assert nm.weight_bytes() == 6 * 4 * 8 + 6 * 4 * 1
    model = TwoLinear(seed=0)
    prune_model(model, "magnitude", 0.5)
    model.freeze_all()
    assert frozen_weight_bytes(model) == (15 * 12 + 7 * 4) + (12 * 12 + 5 * 4)  # (a: 30 → 15 kept, b: 24 → 12)


def test_prune_model_report_and_errors():
    model = TwoLinear(seed=0)
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        prune_model(model, "magnitude", 1.0)
    with pytest.raises(ValueError, match="activation norms"):
        prune_model(model, "wanda", 0.5)
    with pytest.raises(ValueError, match="divisible by M=4"):
        prune_model(model, "magnitude", nm=(2, 4))
    with pytest.raises(ValueError, match="unknown pruning score"):
        prune_model(model, "random", 0.5)
    assert type(model.a) is Linear  # nothing installed
    rep = prune_model(model, "magnitude", 0.3)
    assert rep["a"]["zeros"] == 9 and rep["b"]["zeros"] == 7


def test_parse_prune_method():
    assert parse_prune_method("wanda") == ("wanda", None)
    assert parse_prune_method("2:4") == ("wanda", (2, 4))
    assert parse_prune_method("magnitude-2:4") == ("magnitude", (2, 4))
    with pytest.raises(ValueError, match="--prune_method"):
        parse_prune_method("sparsegpt")
    with pytest.raises(ValueError, match="0 < N < M"):
        parse_prune_method("4:4")
    assert method_tag("wanda", 0.5, None) == "wanda50" and method_tag("wanda", 0.5, (2, 4)) == "wanda2:4"


# --- QLoRA on a pruned base: prune, then quantise ------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("pattern", [dict(nm=(2, 4)), dict(sparsity=0.99)])  # 0.99: whole 64-blocks pruned (absmax 0)
def test_prune_then_quantise_keeps_the_support(quant_type, pattern):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 64)).astype(np.float32)
    from tests._nets import Bag  # noqa: PLC0415
    model = Bag([Linear(W)])
    prune_model(model, "magnitude", **pattern)
    keep = model.l0.mask()
    quantize_model(model, quant_type=quant_type)
    Wq = model.l0.effective_weight()
    assert np.isfinite(Wq).all()
    assert np.array_equal(Wq[~keep], np.zeros(int((~keep).sum()), np.float32))  # exactly 0 where pruned
    assert (Wq[keep] != 0).mean() > 0.9  # the kept weights are (almost all) still there


# --- merging ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merge_keeps_sparsity_or_densifies(kind):
    base, W = _pruned(kind, seed=8)
    rng = np.random.default_rng(9)
    from tests._nets import Bag  # noqa: PLC0415
    peft = get_peft_model(Bag([base]), LoraConfig(r=2, lora_alpha=2, target_modules=["l0"]), seed=0)
    layer = peft.model.l0
    layer.params["lora_B.weight"][...] = rng.standard_normal(layer.params["lora_B.weight"].shape)
    A, B = layer.params["lora_A.weight"], layer.params["lora_B.weight"]
    delta = B @ A  # scaling lora_alpha / r = 1
    P = base.mask()
    Wp = np.where(P, W, 0.0)
    frac = off_support_fraction(layer)
    assert_close(frac, np.linalg.norm(delta * ~P) / np.linalg.norm(delta), "off-support fraction", rtol=1e-12)
    kept = merge_pruned(layer, keep_sparsity=True)
    assert type(kept) is type(base) and np.array_equal(kept.mask(), P) and kept.weight_bytes() == base.weight_bytes()
    assert_close(kept.effective_weight(), Wp + np.where(P, delta, 0.0), "masked merge", rtol=1e-12)
    dense = merge_pruned(layer, keep_sparsity=False)
    assert type(dense) is Linear
    assert_close(dense.effective_weight(), Wp + delta, "dense merge", rtol=1e-12)
    x = rng.standard_normal((3, 8))
    assert_close(dense.forward(x), layer.forward(x), "dense merge output", rtol=1e-12)
    with pytest.raises(TypeError, match="keep_sparsity must be"):
        merge_pruned(layer, keep_sparsity="yes")
    model = merge_and_unload_pruned(peft, keep_sparsity=True)
    assert type(model.l0) is type(base)


# --- the run's pruned rows (end to end, --quick shapes) ----------------------------------------------
@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return tmp_path_factory.mktemp("prune_run")


@pytest.mark.parametrize("method, per_layer_bytes", [
    # CSR: 8 bytes per kept weight (6C² of the 12C² target weights) + indptr (Σ d_out + 1 = 9C + 4) · 4, less dense 48C²
    ("wanda", lambda C: 4 * (9 * C + 4)),
    # 2:4 packed float32 + uint8: 5 bytes per kept weight (6C²), less dense 48C²
    ("2:4", lambda C: 30 * C * C - 48 * C * C)])
def test_run_adds_pruned_rows(run_root, method, per_layer_bytes):
    from spectral_peft.commands.run import run  # noqa: PLC0415
    from spectral_peft.commands.run_options import QUICK, RunConfig  # noqa: PLC0415
    cfg = RunConfig(**{**QUICK, "steps": 3}, methods="lora", prune="0.5", prune_method=method, out=str(run_root / "runs"),
                    cache_dir=str(run_root / "cache"), progress=False, figures=True)
    cfg.validate()
    results, folder = run(cfg, log=lambda *a: None)
    C, L = QUICK["n_embd"], QUICK["n_layer"]
    tag = "wanda50" if method == "wanda" else "wanda2:4"
    rows = {m["method"]: m for m in results["methods"]}
    assert set(rows) == {"lora", f"lora+{tag}"}
    (point,) = results["pruning"]["points"]
    assert point["size"] == 12 * C * C * L and point["zeros"] == 6 * C * C * L  # exactly half of every target
    assert rows[f"lora+{tag}"]["trainable_params"] == rows["lora"]["trainable_params"] == QUICK["r"] * 16 * C * L
    diff = rows[f"lora+{tag}"]["frozen_weight_bytes"] - rows["lora"]["frozen_weight_bytes"]
    assert diff == L * per_layer_bytes(C)
    assert point["adapted"]["lora"] == rows[f"lora+{tag}"]["final_eval_loss"]
    assert (run_root / "runs" / os.path.basename(folder) / "pruning.png").exists()


# --- every backend: the same masks and products as on the CPU ------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_pruned_layers_on_every_backend_equal_the_cpu(backend64, kind):
    from spectral_peft.backend import to_host  # noqa: PLC0415
    rng = np.random.default_rng(11)
    W, b, x, dy = (rng.standard_normal(s) for s in ((6, 8), (6,), (5, 8), (5, 6)))
    a = np.abs(rng.standard_normal(8)) + 0.1
    xp = backend64.xp
    if kind == "nm":
        keep = nm_mask(wanda_scores(xp.asarray(W), xp.asarray(a)), 2, 4)
        assert np.array_equal(to_host(keep), nm_mask(np.abs(W) * a, 2, 4))
        layer = NMSparseLinear.from_linear(Linear(xp.asarray(W), xp.asarray(b)), keep, 2, 4)
    else:
        keep = wanda_mask(xp.asarray(W), xp.asarray(a), 0.5)
        assert np.array_equal(to_host(keep), wanda_mask(W, a, 0.5))
        layer = SparseLinear.from_linear(Linear(xp.asarray(W), xp.asarray(b)), keep,
                                         "dense" if kind == "csr-dense" else "spmm")
    Wp = np.where(to_host(keep), W, 0.0)
    assert_close(to_host(layer.forward(xp.asarray(x))), x @ Wp.T + b, f"{kind} y ({backend64.device})", rtol=1e-12)
    assert_close(to_host(layer.backward(xp.asarray(dy))), dy @ Wp, f"{kind} dx ({backend64.device})", rtol=1e-12)
    assert_close(to_host(layer.grads["bias"]), dy.sum(axis=0), f"{kind} db ({backend64.device})", rtol=1e-12)
