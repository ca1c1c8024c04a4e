"""PiSSA, OLoRA and LoftQ initialisations (spectral_peft/adapters/lora_init.py) against PEFT 0.21.2.

Expected values come from PEFT itself (its pissa_init / olora_init run on a torch nn.Linear holding
the same weights), from a float64 transcription of PEFT's loftq_init with bitsandbytes' own NF4
quantiser (PEFT's loftq_init moves the weight to "cuda"/"xpu" unconditionally, so it cannot run on
a CPU-only torch), or from the SVD / QR written out here. What is compared is sign-independent:
s·B A, the residual base W_res, A Aᵀ and Bᵀ B (an SVD or QR fixes its vectors only up to sign).

PEFT's pissa_init and olora_init refuse a float64 weight and compute in float32. To run PEFT's own
code in float64, :func:`float64_as_float32` rebinds ``torch.float32`` to ``torch.float64`` for the
duration of the init call only (PEFT's dtype check and its ``.to(torch.float32)`` then keep float64);
a float32 comparison with PEFT unpatched is done too.
"""
import contextlib
import itertools
import json
import math
import os

import bitsandbytes.functional as bnbF
import numpy as np
import peft
import pytest
import torch

from spectral_peft.adapters.lora import A_KEY, B_KEY, LoraConfig, LoraLinear
from spectral_peft.adapters.lora_init import randomized_svd
from spectral_peft.adapters.peft_model import get_peft_model, load_peft_model
from spectral_peft.module import Linear
from spectral_peft.quant import Linear4bit, dequantize_4bit, quantize_4bit
from spectral_peft.testing import assert_close
from tests._nets import TwoLinear

TOL = 1e-10  # float64 parity, relative to max|W| (entries of W are O(1))


@contextlib.contextmanager
def float64_as_float32():
    """torch.float32 names float64 inside the block (see the module docstring)."""
    saved = torch.float32
    torch.float32 = torch.float64
    try:
        yield
    finally:
        torch.float32 = saved


class _Net(torch.nn.Module):
    def __init__(self, d_out, d_in):
        super().__init__()
        self.l0 = torch.nn.Linear(d_in, d_out, bias=False)


def peft_init(W, r, lora_alpha, init, use_rslora=False, dtype=torch.float64, seed=0):
    """PEFT's init on a torch Linear holding W: -> A (r, d_in), B (d_out, r), W_res, s (float64 numpy)."""
    net = _Net(*W.shape).to(dtype)
    with torch.no_grad():
        net.l0.weight.copy_(torch.tensor(W, dtype=dtype))
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(target_modules=["l0"], r=r, lora_alpha=lora_alpha, init_lora_weights=init,
                          use_rslora=use_rslora)
    with float64_as_float32() if dtype == torch.float64 else contextlib.nullcontext():
        layer = peft.get_peft_model(net, cfg).base_model.model.l0
    A, B, Wres = (t.detach().to(torch.float64).numpy()
                  for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight))
    return A, B, Wres, layer.scaling["default"]


def engine_init(W, r, lora_alpha, init, use_rslora=False, seed=0, **kw):
    """The engine's layer on Linear(W): -> A, B, W_res, s, layer (float64 numpy)."""
    layer = LoraLinear(Linear(W.copy()), r=r, lora_alpha=lora_alpha, init_lora_weights=init,
                       use_rslora=use_rslora, rng=np.random.default_rng(seed), **kw)
    return (layer.params[A_KEY], layer.params[B_KEY], np.asarray(layer.base_layer.effective_weight()),
            layer.scaling, layer)


def rel(a, b, scale):
    return float(np.abs(a - b).max() / scale)


# --- PiSSA (exact SVD) -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, r, alpha, rslora", [((10, 12), 3, 6, False), ((12, 7), 4, 2, True),
                                                     ((9, 9), 9, 16, False)])
def test_pissa_matches_peft_in_float64(shape, r, alpha, rslora):
    W = np.random.default_rng(1).standard_normal(shape)
    A, B, Wres, s, layer = engine_init(W, r, alpha, "pissa", rslora)
    Ap, Bp, Wresp, sp = peft_init(W, r, alpha, "pissa", rslora)
    assert s == sp
    m = np.abs(W).max()
    assert_close(s * B @ A, s * Bp @ Ap, "s·B A vs PEFT", rtol=0, atol=TOL * m)
    assert_close(Wres, Wresp, "W_res vs PEFT", rtol=0, atol=TOL * m)
    # the split of S between the factors: A Aᵀ = Bᵀ B = diag(S_r / s), as PEFT's (sign-independent)
    S = np.linalg.svd(W, compute_uv=False)[:r]
    assert_close(A @ A.T, np.diag(S / s), "A Aᵀ", rtol=0, atol=TOL * S[0] / s)
    assert_close(B.T @ B, Bp.T @ Bp, "Bᵀ B vs PEFT", rtol=0, atol=TOL * S[0] / s)
    # s·B A is the rank-r truncation, and the effective weight is W
    U, Sf, Vh = np.linalg.svd(W)
    assert_close(s * B @ A, (U[:, :r] * Sf[:r]) @ Vh[:r], "s·B A vs U_r S_r V_rᵀ", rtol=0, atol=TOL * m)
    assert_close(Wres + s * B @ A, W, "W_res + s·B A", rtol=0, atol=1e-13 * m)
    assert_close(layer.forward(np.eye(shape[1])), W.T, "layer applies W at init", rtol=0, atol=1e-13 * m)


def test_pissa_matches_unpatched_peft_in_float32():
    """PEFT's code as shipped (float32 SVD): the engine's float64 result within float32 rounding."""
    W = np.random.default_rng(2).standard_normal((16, 20))
    A, B, Wres, s, _ = engine_init(W, 4, 8, "pissa")
    Ap, Bp, Wresp, _ = peft_init(W.astype(np.float32).astype(np.float64), 4, 8, "pissa", dtype=torch.float32)
    m = np.abs(W).max()
    assert rel(s * B @ A, s * Bp @ Ap, m) < 1e-5  # float32 eps 6e-8 times the SVD's conditioning, 20·√(d)
    assert rel(Wres, Wresp, m) < 1e-5


# --- PiSSA with the randomized SVD ----------------------------------------------------------------------
def gapped(d_out, d_in, r, gap, seed):
    """W = U diag(σ) Vᵀ with σ_1..σ_r in [1, 2] and σ_{r+1..} = gap·σ_r·[1, 0.5]: σ_{r+1}/σ_r = gap."""
    rng = np.random.default_rng(seed)
    k = min(d_out, d_in)
    U = np.linalg.qr(rng.standard_normal((d_out, k)))[0]
    V = np.linalg.qr(rng.standard_normal((d_in, k)))[0]
    sig = np.concatenate([np.linspace(2, 1, r), gap * np.linspace(1, 0.5, k - r)])
    return (U * sig) @ V.T


@pytest.mark.parametrize("shape", [(14, 20), (20, 14)])
def test_pissa_niter_matches_peft_within_the_randomized_svd_accuracy(shape):
    """Subspace iteration's error in the rank-r range shrinks as (σ_{r+1}/σ_r)^(2N+1) (Halko et al.
    2011, §4.5) times tan θ₀ of the random start. With σ_{r+1}/σ_r = 1e-3 and N = 2 that factor is
    1e-15; the 1e-9 allowed here (relative to ‖W‖₂ = 2) leaves 1e6 for tan θ₀ and rounding, and the
    two implementations draw different test matrices (torch's generator, the layer's host stream)."""
    r, N = 3, 2
    W = gapped(*shape, r, 1e-3, seed=3)
    A, B, Wres, s, _ = engine_init(W, r, 6, f"pissa_niter_{N}")
    Ap, Bp, Wresp, _ = peft_init(W, r, 6, f"pissa_niter_{N}")
    U, S, Vh = np.linalg.svd(W)
    exact = (U[:, :r] * S[:r]) @ Vh[:r]
    assert rel(s * B @ A, exact, 2) < 1e-9
    assert rel(s * Bp @ Ap, exact, 2) < 1e-9
    assert rel(s * B @ A, s * Bp @ Ap, 2) < 1e-9
    assert rel(Wres, Wresp, 2) < 1e-9
    assert_close(Wres + s * B @ A, W, "W_res + s·B A", rtol=0, atol=1e-14)  # exact whatever the SVD's accuracy


class _Given:
    """A stand-in generator whose one standard_normal draw is a given array."""

    def __init__(self, draw):
        self.draw = draw

    def standard_normal(self, shape):
        assert shape == self.draw.shape, (shape, self.draw.shape)
        return self.draw


@pytest.mark.parametrize("shape, niter", [((30, 40), 0), ((30, 40), 4), ((40, 30), 2), ((25, 25), 16)])
def test_randomized_svd_is_torch_svd_lowrank_given_the_same_draw(shape, niter):
    """torch.svd_lowrank(W, q, niter) draws Ω = randn(n', q) for the tall orientation (n' = min side);
    fed that same Ω, the engine's randomized_svd gives the same rank-q approximation."""
    W = np.random.default_rng(15).standard_normal(shape)
    q = 4
    torch.manual_seed(3)
    omega = torch.randn(min(shape), q, dtype=torch.float64).numpy()
    torch.manual_seed(3)
    Ut, St, Vt = torch.svd_lowrank(torch.tensor(W), q, niter=niter)
    U, S, Vh = randomized_svd(W, q, niter, _Given(omega))
    expected = ((Ut * St) @ Vt.T).numpy()
    assert_close((U * S) @ Vh, expected, "U S Vh vs torch.svd_lowrank", rtol=0, atol=1e-12)
    assert_close(S, St.numpy(), "S vs torch", rtol=1e-12)


def test_pissa_niter_is_randomized_and_converges_with_niter():
    """No gap in a Gaussian W: niter=0 (a bare range finder) is visibly off the exact truncation,
    more iterations bring it closer; the draws come from the layer's host generator."""
    W = np.random.default_rng(4).standard_normal((30, 40))
    U, S, Vh = np.linalg.svd(W)
    exact = (U[:, :4] * S[:4]) @ Vh[:4]
    err = {}
    for n in (0, 2, 16):
        A, B, _, s, _ = engine_init(W, 4, 4, f"pissa_niter_{n}")
        err[n] = np.linalg.norm(s * B @ A - exact) / np.linalg.norm(exact)
    assert err[0] > 0.1 and err[16] < err[2] < err[0], err
    A1, B1, *_ = engine_init(W, 4, 4, "pissa_niter_0", seed=0)
    A2, B2, *_ = engine_init(W, 4, 4, "pissa_niter_0", seed=1)
    A3, B3, *_ = engine_init(W, 4, 4, "pissa_niter_0", seed=0)
    assert np.abs(B1 @ A1 - B2 @ A2).max() > 1e-3 and np.array_equal(B1 @ A1, B3 @ A3)


def test_randomized_svd_with_full_rank_is_the_svd():
    """q = n for a tall (m, n) W: range(W Ω) = range(W), so the result is W's thin SVD."""
    W = np.random.default_rng(5).standard_normal((9, 6))
    U, S, Vh = randomized_svd(W, 6, 0, np.random.default_rng(0))
    assert_close(S, np.linalg.svd(W, compute_uv=False), "S", rtol=1e-12)
    assert_close((U * S) @ Vh, W, "U S Vh", rtol=0, atol=1e-12)
    assert_close(U.T @ U, np.eye(6), "UᵀU", rtol=0, atol=1e-12)


# --- OLoRA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, r, alpha, name", [((10, 12), 3, 6, "olora"), ((12, 7), 5, 5, "OLoRA")])
def test_olora_matches_peft_in_float64(shape, r, alpha, name):
    W = np.random.default_rng(6).standard_normal(shape)
    A, B, Wres, s, _ = engine_init(W, r, alpha, name)
    Ap, Bp, Wresp, _ = peft_init(W, r, alpha, name)
    m = np.abs(W).max()
    assert_close(s * B @ A, s * Bp @ Ap, "s·B A vs PEFT", rtol=0, atol=TOL * m)
    assert_close(Wres, Wresp, "W_res vs PEFT", rtol=0, atol=TOL * m)
    assert_close(A @ A.T, Ap @ Ap.T, "A Aᵀ vs PEFT", rtol=0, atol=TOL * m * m)
    # B = Q[:, :r] orthonormal, A = R[:r] upper trapezoidal, B A the first r terms of W = Q R (no 1/s)
    assert_close(B.T @ B, np.eye(r), "Bᵀ B", rtol=0, atol=1e-13)
    assert np.all(np.tril(A, -1) == 0)
    Q, R = np.linalg.qr(W)
    assert_close(B @ A, Q[:, :r] @ R[:r], "B A vs Q_r R_r", rtol=0, atol=TOL * m)
    assert_close(Wres + s * B @ A, W, "W_res + s·B A", rtol=0, atol=1e-13 * m)


def test_olora_on_a_4bit_base_requantises_the_residual():
    """PEFT's rule: dequantise, subtract s·B A, quantise again with the base's own settings."""
    W = np.random.default_rng(7).standard_normal((16, 24))
    base = Linear4bit.from_linear(Linear(W), blocksize=64, compress_statistics=True)
    Wq = np.asarray(base.effective_weight(), dtype=np.float64)
    layer = LoraLinear(base, r=2, lora_alpha=4, init_lora_weights="olora", rng=np.random.default_rng(0))
    A, B, s = layer.params[A_KEY], layer.params[B_KEY], layer.scaling
    Q, R = np.linalg.qr(Wq)
    assert_close(B @ A, Q[:, :2] @ R[:2], "B A from the dequantised W", rtol=0, atol=1e-12)
    packed, state = quantize_4bit(Wq - s * B @ A, blocksize=64, compress_statistics=True)
    assert isinstance(layer.base_layer, Linear4bit) and layer.base_layer.quant_state.nested
    assert np.array_equal(layer.base_layer.packed, packed)
    assert np.array_equal(layer.base_layer.effective_weight(), dequantize_4bit(packed, state))


# --- LoftQ -------------------------------------------------------------------------------------------
def peft_loftq_float64(W, r, num_iter):
    """PEFT 0.21.2 loftq_init (utils/loftq_utils.py), transcribed in float64 on the CPU: the quantiser
    is the one PEFT calls, bitsandbytes NF4 through Params4bit's defaults (blocksize 64,
    compress_statistics=False, float32 input); the SVD and the products in float64.
    -> Q (the dequantised base), lora_A = R, lora_B = L, as float64 numpy."""
    weight = torch.tensor(W, dtype=torch.float64)
    res = weight.clone()
    for i in range(num_iter):
        q, st = bnbF.quantize_4bit(res.to(torch.float32), blocksize=64, compress_statistics=False, quant_type="nf4")
        deq = bnbF.dequantize_4bit(q, st).to(torch.float64)
        res = weight - deq
        U, S, Vh = torch.linalg.svd(res, full_matrices=False)
        L = U @ torch.sqrt(torch.diag(S)[:, :r])
        R = torch.sqrt(torch.diag(S)[:r, :]) @ Vh
        if i + 1 == num_iter:
            break
        res = weight - L @ R
    return deq.numpy(), R.numpy(), L.numpy(), q.numpy()


@pytest.mark.parametrize("shape, r, iters", [((16, 24), 2, 1), ((16, 24), 3, 4), ((10, 13), 2, 3)])
def test_loftq_matches_peft_float64_transcription(shape, r, iters):
    W = np.random.default_rng(8).standard_normal(shape)
    Qp, Ap, Bp, codes = peft_loftq_float64(W, r, iters)
    layer = LoraLinear(Linear(W.copy()), r=r, lora_alpha=r, init_lora_weights="loftq", rng=np.random.default_rng(0),
                       loftq_config={"loftq_bits": 4, "loftq_iter": iters})
    A, B = layer.params[A_KEY], layer.params[B_KEY]
    base = layer.base_layer
    assert isinstance(base, Linear4bit) and base.quant_state.blocksize == 64 and not base.quant_state.nested
    assert np.array_equal(base.packed.reshape(-1), codes.reshape(-1))  # the same NF4 codes, bit for bit
    assert np.array_equal(np.asarray(base.effective_weight()), Qp)  # and the same dequantised values
    assert_close(B @ A, Bp @ Ap, "L R vs PEFT", rtol=0, atol=TOL * np.abs(W).max())
    assert_close(A @ A.T, Ap @ Ap.T, "A Aᵀ vs PEFT", rtol=0, atol=TOL)


def test_loftq_error_decreases_with_loftq_iter():
    """‖W − (Q + s·B A)‖_F with s = 1 (lora_alpha = r; PEFT puts L, R into B, A without 1/s): below
    plain NF4's ‖W − Q(W)‖ and decreasing over loftq_iter = 1..5 on this W."""
    W = np.random.default_rng(9).standard_normal((32, 48))
    packed, state = quantize_4bit(W, blocksize=64)
    plain = np.linalg.norm(W - dequantize_4bit(packed, state))
    err = []
    for it in range(1, 6):
        layer = LoraLinear(Linear(W.copy()), r=4, lora_alpha=4, init_lora_weights="loftq",
                           rng=np.random.default_rng(0), loftq_config={"loftq_iter": it})
        err.append(np.linalg.norm(W - layer.effective_weight()))
    assert err[0] < plain
    assert all(b < a for a, b in itertools.pairwise(err)), err


# --- names and refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pissa_niter_", "pissa_niter_x", "pissa_niter_-1", "pissa_niter_2.5", "PiSSA",
                                  "pissa_foo", "LOFTQ", "olora_niter_2", "gaussian_", ""])
def test_bad_init_names_are_refused_by_name(name):
    with pytest.raises(ValueError, match=r"LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa'"):
        LoraConfig(target_modules=["a"], init_lora_weights=name)
    with pytest.raises(ValueError, match=repr(name).replace("[", r"\[")):
        LoraLinear(Linear(np.ones((3, 4))), r=1, init_lora_weights=name, rng=np.random.default_rng(0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(init_lora_weights="loftq"), r"loftq_config must be given"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}), r"only 4 \(NF4\)"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_iter": 0}), r"loftq_iter'\] must be an integer >= 1"),
    (dict(init_lora_weights="loftq", loftq_config={"iters": 2}), r"unknown keys \['iters'\]"),
    (dict(init_lora_weights="pissa", loftq_config={"loftq_iter": 2}), r"only used with init_lora_weights='loftq'"),
])
def test_bad_loftq_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(target_modules=["a"], **kwargs)


def test_accepted_names_and_the_file_round_trip():
    for name in ("pissa", "pissa_niter_0", "pissa_niter_16", "olora", "OLoRA"):
        c = LoraConfig(target_modules=["a"], init_lora_weights=name)
        assert LoraConfig.from_json_dict(c.to_json_dict()).init_lora_weights == name
    c = LoraConfig(target_modules=["a"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 3})
    d = c.to_json_dict()
    assert d["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 3}
    assert LoraConfig.from_json_dict(d).loftq_config == d["loftq_config"]
    assert LoraConfig(target_modules=["a"]).to_json_dict()["loftq_config"] == {}  # as PEFT writes it


def test_refusals_of_the_base():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"needs r <= min\(d_out, d_in\) = 3 \(module 'x'\), got r=4"):
        LoraLinear(Linear(np.ones((3, 5))), r=4, init_lora_weights="pissa", rng=rng, path="x")
    q4 = Linear4bit.from_linear(Linear(np.random.default_rng(1).standard_normal((8, 8))))
    for name, cfg in (("pissa", None), ("loftq", {"loftq_iter": 1})):
        with pytest.raises(TypeError, match="needs the full-precision weight"):
            LoraLinear(q4, r=2, init_lora_weights=name, rng=rng, loftq_config=cfg)


# --- in a model; saving; PiSSA back to plain LoRA -------------------------------------------------------
def test_model_starts_equal_to_its_base_and_the_base_is_frozen():
    x = np.random.default_rng(10).standard_normal((7, 5))
    y0 = TwoLinear().forward(x)
    for name in ("pissa", "pissa_niter_3", "olora"):
        pm = get_peft_model(TwoLinear(), LoraConfig(target_modules=["a", "b"], r=2, lora_alpha=4, init_lora_weights=name))
        assert_close(pm.forward(x), y0, f"{name}: outputs at init", rtol=0, atol=1e-12)
        trainable = {k for k, _, _ in pm.named_parameters(trainable_only=True)}
        assert trainable == {f"base_model.model.{m}.{k}" for m in "ab" for k in (A_KEY, B_KEY)}, trainable
    pm = get_peft_model(TwoLinear(), LoraConfig(target_modules=["b"], r=2, lora_alpha=4, use_dora=True,
                                                init_lora_weights="pissa"))
    assert_close(pm.forward(x), y0, "DoRA + pissa: outputs at init", rtol=0, atol=1e-12)


def _train(pm, seed):
    """Stand-in for training: move every A and B by a random step."""
    rng = np.random.default_rng(seed)
    for _, layer in pm.adapter_layers():
        for k in (A_KEY, B_KEY):
            layer.params[k] = layer.params[k] + 0.3 * rng.standard_normal(layer.params[k].shape)


@pytest.mark.parametrize("name, rslora", [("pissa", False), ("olora", True), ("pissa_niter_2", False)])
def test_converted_adapter_on_the_original_base_gives_the_trained_model(tmp_path, name, rslora):
    x = np.random.default_rng(11).standard_normal((7, 5))
    cfg = LoraConfig(target_modules=["a", "b"], r=2, lora_alpha=3, use_rslora=rslora, init_lora_weights=name)
    pm = get_peft_model(TwoLinear(), cfg, seed=5)
    init_dir, out_dir = str(tmp_path / "init"), str(tmp_path / "lora")
    pm.save_pretrained(init_dir)
    _train(pm, 12)
    y_trained = pm.forward(x)
    pm.save_pretrained(out_dir, path_initial_model_for_weight_conversion=init_dir)
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        d = json.load(f)
    assert (d["init_lora_weights"], d["r"]) == (True, 4)
    assert d["lora_alpha"] == pytest.approx(3 * (math.sqrt(2) if rslora else 2), rel=1e-15)
    with open(os.path.join(init_dir, "adapter_config.json")) as f:
        assert json.load(f)["init_lora_weights"] is True  # as PEFT rewrites it
    plain = load_peft_model(TwoLinear(), out_dir)  # the ORIGINAL base
    assert_close(plain.forward(x), y_trained, "converted LoRA on W vs trained model", rtol=0, atol=1e-12)
    # PEFT reads the converted file onto the original base and computes the same outputs
    net = torch.nn.Sequential()
    base = TwoLinear()
    net.a = torch.nn.Linear(5, 6, bias=False).double()
    net.b = torch.nn.Linear(6, 4, bias=False).double()
    with torch.no_grad():
        net.a.weight.copy_(torch.tensor(base.a.params["weight"]))
        net.b.weight.copy_(torch.tensor(base.b.params["weight"]))
    tpm = peft.PeftModel.from_pretrained(net, out_dir)
    with torch.no_grad():
        yt = tpm.base_model.model.b(tpm.base_model.model.a(torch.tensor(x))).numpy()
    assert_close(yt, y_trained, "PEFT on the converted file", rtol=0, atol=1e-12)


def test_unconverted_pissa_file_reloads_onto_the_original_base(tmp_path):
    """Without conversion the file keeps init_lora_weights='pissa': loading onto W decomposes it again
    (deterministic for the exact SVD), then installs the trained A, B, as PEFT does."""
    x = np.random.default_rng(13).standard_normal((7, 5))
    pm = get_peft_model(TwoLinear(), LoraConfig(target_modules=["a", "b"], r=2, lora_alpha=4, init_lora_weights="pissa"))
    _train(pm, 14)
    pm.save_pretrained(str(tmp_path))
    again = load_peft_model(TwoLinear(), str(tmp_path))
    assert_close(again.forward(x), pm.forward(x), "reloaded PiSSA adapter", rtol=0, atol=1e-12)


def test_conversion_refusals(tmp_path):
    pm = get_peft_model(TwoLinear(), LoraConfig(target_modules=["a"], r=2, lora_alpha=2, init_lora_weights="loftq",
                                                loftq_config={"loftq_iter": 1}))
    pm.save_pretrained(str(tmp_path / "i"))
    with pytest.raises(ValueError, match="the base is the 4-bit Q"):
        pm.save_pretrained(str(tmp_path / "o"), path_initial_model_for_weight_conversion=str(tmp_path / "i"))
    pm = get_peft_model(TwoLinear(), LoraConfig(target_modules=["a"], r=2, use_rslora=True, rank_pattern={"a": 3},
                                                init_lora_weights="pissa"))
    pm.save_pretrained(str(tmp_path / "j"))
    with pytest.raises(ValueError, match="not supported with use_rslora=True"):
        pm.save_pretrained(str(tmp_path / "p"), path_initial_model_for_weight_conversion=str(tmp_path / "j"))
