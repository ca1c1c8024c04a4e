"""LoRA initialisations that read the base weight: PiSSA, OLoRA and LoftQ (PEFT's ``init_lora_weights``).

Facts from PEFT 0.21.2 ``peft/tuners/lora/layer.py`` (``pissa_init``, ``olora_init``,
``loftq_init``) and ``peft/utils/loftq_utils.py``; docs/lora.md ("Initialisations: PiSSA, OLoRA,
LoftQ") derives them. Every function here works on host float64 arrays and returns host float64
arrays; :func:`residual_init` is the one place a layer calls them (LoraLinear.__init__).

Shape legend: W (d_out, d_in) the base weight, r the rank, s the LoRA scaling, k = min(d_out, d_in).

    "pissa"            W = U S Vᵀ (exact SVD);  A = √(S_r/s) V_rᵀ (r, d_in),  B = U_r √(S_r/s) (d_out, r)
    "pissa_niter_N"    the same from a randomized SVD (Halko et al. 2011, Alg. 5.1 with N subspace
                       iterations, q = r, as torch.svd_lowrank), the Gaussian test matrix drawn
                       from the layer's host generator
    "olora"            W = Q R (reduced QR);  A = R[:r] (r, d_in),  B = Q[:, :r] (d_out, r)  (no 1/s)
    then, for all three, the frozen base becomes the residual  W_res = W − s·B A, so that
    W_res + s·B A = W: the adapted model starts equal to the base, up to rounding.

    "loftq"            (4-bit NF4, blocksize 64, no double quantisation, as PEFT's bitsandbytes call)
                       res = W; repeat loftq_iter times:
                           Q = dequant(quant(res));  L R = best rank-r of W − Q  (L = U_r √S_r, R = √S_r V_rᵀ)
                           res = W − L R  (skipped after the last round)
                       A = R, B = L (no 1/s, as PEFT), and the frozen base becomes the 4-bit Q.

The products s·B A and W_res are sign-independent (an SVD or QR is unique only up to the signs of
its vectors): they are what tests/test_lora_inits.py compares with PEFT.
"""
from __future__ import annotations

import re

import numpy as np

from ..backend import to_host
from ..module import Linear
from ..quant.blockwise import dequantize_4bit, quantize_4bit
from ..quant.linear4bit import Linear4bit

PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # PEFT's LoftQConfig defaults
LOFTQ_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which PEFT's loftq_init uses


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------
def residual_kind(init_lora_weights) -> tuple[str, int | None] | None:
    """("pissa", None), ("pissa", N), ("olora", None), ("loftq", None), or None for the inits that
    leave the base alone (True, False, "gaussian"). Raises ValueError for any other value."""
    v = init_lora_weights
    if v is True or v is False or v == "gaussian":
        return None
    if isinstance(v, str):
        if v == "pissa":
            return ("pissa", None)
        m = PISSA_NITER.fullmatch(v)
        if m:
            return ("pissa", int(m.group(1)))
        if v.lower() == "olora":  # PEFT compares lower-cased
            return ("olora", None)
        if v == "loftq":
            return ("loftq", None)
    raise ValueError(f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_N' (N a "
                     f"non-negative integer, e.g. 'pissa_niter_4'), 'olora' or 'loftq', got {v!r}")


def check_loftq_config(owner: str, init_lora_weights, loftq_config) -> dict:
    """The completed {loftq_bits, loftq_iter} for init "loftq" ({} otherwise); errors name the field."""
    if loftq_config is None:
        loftq_config = {}
    if not isinstance(loftq_config, dict):
        raise TypeError(f"{owner}.loftq_config must be a dict like {LOFTQ_DEFAULTS}, got {loftq_config!r}")
    if init_lora_weights != "loftq":
        if loftq_config:
            raise ValueError(f"{owner}.loftq_config={loftq_config!r} is only used with init_lora_weights='loftq' "
                             f"(got init_lora_weights={init_lora_weights!r}); pass loftq_config={{}}")
        return {}
    if not loftq_config:  # PEFT: "`loftq_config` must be specified when `init_lora_weights` is 'loftq'"
        raise ValueError(f"{owner}.loftq_config must be given with init_lora_weights='loftq', e.g. {LOFTQ_DEFAULTS}")
    unknown = sorted(set(loftq_config) - set(LOFTQ_DEFAULTS))
    if unknown:
        raise ValueError(f"{owner}.loftq_config has unknown keys {unknown}; the keys are {sorted(LOFTQ_DEFAULTS)}")
    out = {**LOFTQ_DEFAULTS, **loftq_config}
    if out["loftq_bits"] != 4:
        raise ValueError(f"{owner}.loftq_config['loftq_bits']={out['loftq_bits']!r}: only 4 (NF4) is supported; "
                         "the engine has no 8-bit base layer")
    it = out["loftq_iter"]
    if isinstance(it, bool) or not isinstance(it, int) or it < 1:
        raise ValueError(f"{owner}.loftq_config['loftq_iter'] must be an integer >= 1, got {it!r}")
    return out


# ------------------------------------------------------------------------------------------------
# The decompositions (host float64)
# ------------------------------------------------------------------------------------------------
def randomized_svd(W, q: int, niter: int, rng):
    """Rank-q randomized SVD of W (m, n) with ``niter`` subspace iterations (Halko et al. 2011,
    Alg. 4.4 + 5.1, no oversampling: torch.svd_lowrank's algorithm). -> U (m, q), S (q,), Vh (q, n).
    The Gaussian test matrix Ω comes from ``rng`` (host numpy Generator)."""
    tall = W.shape[0] >= W.shape[1]
    M = W if tall else W.T  # (m', n') with m' >= n', as torch assumes a tall matrix
    omega = rng.standard_normal((M.shape[1], q))  # (n', q)
    Q = np.linalg.qr(M @ omega)[0]  # (m', q) basis of range(M Ω)
    for _ in range(niter):  # power scheme: range((M Mᵀ)^N M Ω), re-orthonormalised each half-step
        Q = np.linalg.qr(M.T @ Q)[0]  # (n', q)
        Q = np.linalg.qr(M @ Q)[0]  # (m', q)
    Ub, S, Vh = np.linalg.svd(Q.T @ M, full_matrices=False)  # (q, n') = Ub S Vh
    U = Q @ Ub  # M ≈ U S Vh
    return (U, S, Vh) if tall else (Vh.T, S, U.T)


def pissa_init(W, r: int, scaling: float, niter: int | None = None, rng=None):
    """PiSSA: W (d_out, d_in) -> A (r, d_in), B (d_out, r), W_res (d_out, d_in), host float64.

    s·B A = U_r S_r V_rᵀ, the rank-r truncation of W; W_res = W − s·B A. ``niter`` None: exact SVD;
    an integer: :func:`randomized_svd` with that many iterations, drawing from ``rng``."""
    if niter is None:
        U, S, Vh = np.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, Vh = randomized_svd(W, r, niter, rng)
    root = np.sqrt(S / scaling)  # (r,) PEFT: Sr /= scaling, then √ into both factors
    A = root[:, None] * Vh  # diag(√(S_r/s)) V_rᵀ   (r, d_in)
    B = U * root[None, :]  # U_r diag(√(S_r/s))     (d_out, r)
    return A, B, W - scaling * (B @ A)


def olora_init(W, r: int, scaling: float):
    """OLoRA: W (d_out, d_in) = Q R -> A = R[:r] (r, d_in), B = Q[:, :r] (d_out, r), W_res = W − s·B A."""
    Q, R = np.linalg.qr(W)  # reduced: Q (d_out, k), R (k, d_in)
    A, B = R[:r], Q[:, :r]
    return A, B, W - scaling * (B @ A)


def low_rank_factors(M, r: int):
    """Best rank-r factors of M (m, n): L = U_r √S_r (m, r), R = √S_r V_rᵀ (r, n), L R = M_r."""
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    root = np.sqrt(S[:r])
    return U[:, :r] * root[None, :], root[:, None] * Vh[:r]


def loftq_init(W, r: int, num_iter: int):
    """LoftQ (NF4, blocksize 64): W (d_out, d_in) host float64 ->
    A = R (r, d_in), B = L (d_out, r), and ``res`` (d_out, d_in), the matrix whose NF4 quantisation
    is the 4-bit base Q (module docstring). Q + L R is the LoftQ approximation of W."""
    res = W
    for i in range(num_iter):
        packed, state = quantize_4bit(res, blocksize=LOFTQ_BLOCKSIZE, quant_type="nf4", compress_statistics=False)
        Q = dequantize_4bit(packed, state).astype(np.float64)  # (d_out, d_in), exact float32 values
        L, R = low_rank_factors(W - Q, r)
        if i + 1 == num_iter:
            break
        res = W - L @ R
    return R, L, res


# ------------------------------------------------------------------------------------------------
# The layer's entry point
# ------------------------------------------------------------------------------------------------
def residual_init(init_lora_weights, base: Linear, r: int, scaling: float, rng, loftq_config: dict,
                  where: str = ""):
    """A (r, d_in), B (d_out, r) as host float64, and the new frozen base (a fresh Linear or Linear4bit
    holding W_res or Q; ``base`` itself is left untouched) for a base-reading init.

    PEFT's rules: PiSSA and LoftQ need a dense base; OLoRA on a 4-bit base dequantises, subtracts and
    quantises the residual again with the base's own settings."""
    kind, niter = residual_kind(init_lora_weights)
    k = min(base.d_out, base.d_in)
    if r > k:
        raise ValueError(f"init_lora_weights={init_lora_weights!r} needs r <= min(d_out, d_in) = {k}{where}, got r={r}")
    quantised = isinstance(base, Linear4bit)
    if type(base) is not Linear and not quantised:
        raise TypeError(f"init_lora_weights={init_lora_weights!r} needs a dense Linear or Linear4bit base{where}, "
                        f"got {type(base).__name__}")
    if quantised and kind != "olora":
        raise TypeError(f"init_lora_weights={init_lora_weights!r} needs the full-precision weight{where}: apply it to "
                        "a dense base (PiSSA: quantise the residual afterwards with quantize_model, QPiSSA; LoftQ "
                        "makes the 4-bit base itself)")
    xp, dtype = base.xp, base.dtype
    W = np.asarray(to_host(base.effective_weight()), dtype=np.float64)  # (d_out, d_in)
    bias = base.params.get("bias")
    if kind == "loftq":
        A, B, res = loftq_init(W, r, loftq_config["loftq_iter"])
        new = Linear4bit.from_linear(Linear(xp.asarray(res.astype(dtype)), bias), "nf4", LOFTQ_BLOCKSIZE,
                                     compress_statistics=False)
        new.frozen = set(new.params)  # inject_adapters froze the old base; the new one is frozen here
        return A, B, new
    if kind == "pissa":
        A, B, W_res = pissa_init(W, r, scaling, niter, rng)
    else:
        A, B, W_res = olora_init(W, r, scaling)
    if quantised:
        st = base.quant_state
        packed, state = quantize_4bit(xp.asarray(W_res.astype(dtype)), blocksize=st.blocksize,
                                      quant_type=st.quant_type, compress_statistics=st.nested)
        new = Linear4bit(packed, state, bias, compute_dtype=dtype)
    else:
        new = Linear(xp.asarray(W_res.astype(dtype)), bias)
    new.frozen = set(new.params)  # inject_adapters froze the old base; the new one is frozen here
    return A, B, new
