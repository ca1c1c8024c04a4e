"""The cases the conformance suite draws: for each contract function a Hypothesis strategy of a
*spec* (a small dict of shapes, a value regime and a seed: what Hypothesis shrinks), and a builder
that turns a spec into the function's keyword arguments in the chosen dtype.

A spec is plain data, so a counterexample prints as ``make_case(name, dtype, spec)`` and rebuilds
the very same arrays anywhere. The regimes are where implementations go wrong:

- linear family (lora, dora, adalora, rosa): r = 1, d_in != d_out, a single token, odd widths,
  no bias; "large" values (x, W ~ 10);
- attention: GQA ratios 1..4, one token, causal or not, padding masks with fully padded rows,
  "large" scores (|q·k/√D| in the hundreds: a naive float32 exp overflows);
- rmsnorm: rows near zero, where eps decides the result; "large" rows;
- rope: positions up to 63, odd numbers of heads, theta 1e4 and 5e5;
- cross_entropy: labels -100 (at least one row kept), "large" logits (~100: a naive float32
  softmax overflows);
- quantize_4bit: partial last blocks, all-zero blocks, every code's value hit exactly and every
  midpoint between neighbouring codes (the tie rule), both quant types;
- dequantize_4bit: every packed byte value, 1-D and 2-D shapes;
- adalora_budget: every phase of the cubic schedule, its boundaries included.
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ..quant.codebooks import get_4bit_code

FLOAT_DTYPES = ("float16", "float32", "float64")
_SCALE = {"normal": 1.0, "large": 10.0, "small": 1e-3}


def _rng(spec):
    return np.random.default_rng(spec["seed"])


def _cast(a, dtype):
    return np.array(a, dtype=np.dtype(dtype), order="C")  # 0-d stays 0-d


# ------------------------------------------------------------------------------------------------
# linear family
# ------------------------------------------------------------------------------------------------
def _linear_spec(**extra):
    return st.fixed_dictionaries({
        "N": st.integers(1, 9), "d_in": st.integers(1, 12), "d_out": st.integers(1, 12), "r": st.integers(1, 4),
        "bias": st.booleans(), "regime": st.sampled_from(["normal", "large"]),
        "scaling": st.sampled_from([0.5, 1.0, 2.0, 16.0]), "seed": st.integers(0, 2**31 - 1), **extra})


def _linear_arrays(spec, dtype):
    rng, s = _rng(spec), _SCALE[spec["regime"]]
    N, d_in, d_out, r = spec["N"], spec["d_in"], spec["d_out"], spec["r"]
    out = {
        "x": _cast(rng.standard_normal((N, d_in)) * s, dtype),
        "weight": _cast(rng.standard_normal((d_out, d_in)) * s / np.sqrt(d_in), dtype),
        "bias": _cast(rng.standard_normal(d_out), dtype) if spec["bias"] else None,
        "lora_A": _cast(rng.standard_normal((r, d_in)) / np.sqrt(d_in), dtype),
        "lora_B": _cast(rng.standard_normal((d_out, r)), dtype),
        "scaling": float(spec["scaling"]),
        "grad_output": _cast(rng.standard_normal((N, d_out)), dtype),
    }
    return out, rng


def build_lora(spec, dtype):
    return _linear_arrays(spec, dtype)[0]


def build_dora(spec, dtype):
    """DoRA's direction V = W + s·B A divides by its row norms: a row with ||V_i|| ≈ 0 makes the
    problem itself ill-conditioned (any dtype's rounding is amplified by 1/||V_i||), as it never is
    at real widths. Such rows of W are moved by a constant of norm ~ the regime's scale."""
    out, rng = _linear_arrays(spec, dtype)
    s, d_in = _SCALE[spec["regime"]], spec["d_in"]
    W = out["weight"].astype(np.float64)
    BA = out["scaling"] * (out["lora_B"].astype(np.float64) @ out["lora_A"].astype(np.float64))
    small = np.sqrt(((W + BA) ** 2).sum(axis=1)) < 0.3 * s
    W[small] += s / np.sqrt(d_in)  # ||V_i + c·1|| >= c·√d_in − ||V_i|| > 0.7 s
    out["weight"] = _cast(W, dtype)
    V = out["weight"].astype(np.float64) + BA
    norm = np.sqrt((V * V).sum(axis=1))
    out["lora_magnitude"] = _cast(norm * rng.uniform(0.5, 1.5, V.shape[0]) + 0.1, dtype)  # m near ||V||
    keys = ["x", "weight", "bias", "lora_A", "lora_B", "lora_magnitude", "scaling", "grad_output"]
    return {k: out[k] for k in keys}


def build_adalora(spec, dtype):
    out, rng = _linear_arrays(spec, dtype)
    r = spec["r"]
    return {"x": out["x"], "weight": out["weight"], "bias": out["bias"], "lora_A": out["lora_A"],
            "lora_E": _cast(rng.standard_normal((r, 1)), dtype), "lora_B": out["lora_B"],
            "scaling": out["scaling"], "ranknum": float(spec["ranknum"]), "grad_output": out["grad_output"]}


def build_rosa(spec, dtype):
    out, rng = _linear_arrays(spec, dtype)
    d_out, d_in = spec["d_out"], spec["d_in"]
    mask = rng.random((d_out, d_in)) < spec["density"]  # empty rows and an empty S included
    indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int64)
    indices = np.nonzero(mask)[1].astype(np.int64)  # row-major: sorted within each row
    values = _cast(rng.standard_normal(int(mask.sum())) * _SCALE[spec["regime"]], dtype)
    return {"x": out["x"], "weight": out["weight"], "bias": out["bias"], "lora_A": out["lora_A"],
            "lora_B": out["lora_B"], "scaling": out["scaling"], "sparse_indptr": indptr, "sparse_indices": indices,
            "sparse_values": values, "grad_output": out["grad_output"]}


# ------------------------------------------------------------------------------------------------
# attention, norms, activations, loss
# ------------------------------------------------------------------------------------------------
ATTENTION_SPEC = st.fixed_dictionaries({
    "B": st.integers(1, 3), "Hkv": st.integers(1, 3), "G": st.integers(1, 4), "T": st.integers(1, 7),
    "D": st.sampled_from([1, 2, 3, 4, 8, 16]), "causal": st.booleans(),
    "mask": st.sampled_from(["none", "random", "left", "one_row_empty"]),
    "regime": st.sampled_from(["normal", "large"]), "seed": st.integers(0, 2**31 - 1)})


def visible_keys(causal: bool, key_padding_mask, B: int, T: int) -> np.ndarray:
    """(B, T) bool: whether query t of batch row b sees any key (rows that see none are not compared)."""
    keys = np.ones((B, T), bool) if key_padding_mask is None else key_padding_mask
    if causal:
        return np.cumsum(keys, axis=1) > 0  # key j <= t
    return np.repeat(keys.any(axis=1, keepdims=True), T, axis=1)


def build_attention(spec, dtype):
    rng = _rng(spec)
    B, Hkv, G, T, D = spec["B"], spec["Hkv"], spec["G"], spec["T"], spec["D"]
    H = G * Hkv
    # large: |q·k/√D| ~ 36..600 (float16: ~4..60), past where a naive exp overflows (88; float16 11)
    s = (2.0 if dtype == "float16" else 6.0) * D ** 0.25 if spec["regime"] == "large" else 1.0
    kind = spec["mask"]
    mask = None
    if kind == "random":
        mask = rng.random((B, T)) < 0.7
    elif kind == "left":
        lengths = rng.integers(1, T + 1, B)
        mask = np.arange(T)[None, :] >= T - lengths[:, None]
    elif kind == "one_row_empty":
        mask = rng.random((B, T)) < 0.7
        mask[rng.integers(0, B)] = False  # a fully padded row
    grad_output = rng.standard_normal((B, H, T, D))
    # query rows that see no key carry no gradient: any finite output there then changes nothing
    grad_output *= visible_keys(spec["causal"], mask, B, T)[:, None, :, None]
    return {"q": _cast(rng.standard_normal((B, H, T, D)) * s, dtype),
            "k": _cast(rng.standard_normal((B, Hkv, T, D)) * s, dtype),
            "v": _cast(rng.standard_normal((B, Hkv, T, D)), dtype),
            "causal": bool(spec["causal"]), "key_padding_mask": mask, "grad_output": _cast(grad_output, dtype)}


RMSNORM_SPEC = st.fixed_dictionaries({
    "N": st.integers(1, 6), "C": st.integers(1, 16), "eps": st.sampled_from([1e-6, 1e-5]),
    "regime": st.sampled_from(["normal", "large", "near_zero"]), "seed": st.integers(0, 2**31 - 1)})


def build_rmsnorm(spec, dtype):
    rng = _rng(spec)
    N, C = spec["N"], spec["C"]
    x = rng.standard_normal((N, C)) * (10.0 if spec["regime"] == "large" else 1.0)
    if spec["regime"] == "near_zero":
        x[::2] *= np.sqrt(spec["eps"])  # every other row with mean(x²) ~ eps: eps decides the result
    return {"x": _cast(x, dtype), "weight": _cast(1 + 0.5 * rng.standard_normal(C), dtype), "eps": float(spec["eps"]),
            "grad_output": _cast(rng.standard_normal((N, C)), dtype)}


ROPE_SPEC = st.fixed_dictionaries({
    "B": st.integers(1, 2), "H": st.integers(1, 3), "T": st.integers(1, 6), "half": st.integers(1, 8),
    "theta": st.sampled_from([1e4, 5e5]), "max_position": st.sampled_from([8, 64]),
    "seed": st.integers(0, 2**31 - 1)})


def build_rope(spec, dtype):
    rng = _rng(spec)
    B, H, T, D = spec["B"], spec["H"], spec["T"], 2 * spec["half"]
    inv_freq = 1.0 / spec["theta"] ** (np.arange(0, D, 2, dtype=np.float64) / D)  # (D/2,)
    return {"x": _cast(rng.standard_normal((B, H, T, D)), dtype),
            "position_ids": rng.integers(0, spec["max_position"], (B, T)).astype(np.int64),
            "inv_freq": _cast(inv_freq, dtype), "grad_output": _cast(rng.standard_normal((B, H, T, D)), dtype)}


SWIGLU_SPEC = st.fixed_dictionaries({
    "N": st.integers(1, 6), "F": st.integers(1, 16), "regime": st.sampled_from(["normal", "large"]),
    "seed": st.integers(0, 2**31 - 1)})


def build_swiglu(spec, dtype):
    rng = _rng(spec)
    shape = (spec["N"], spec["F"])
    s = 8.0 if spec["regime"] == "large" else 1.0  # large: silu in its saturated tails
    return {"gate": _cast(rng.standard_normal(shape) * s, dtype), "up": _cast(rng.standard_normal(shape), dtype),
            "grad_output": _cast(rng.standard_normal(shape), dtype)}


CROSS_ENTROPY_SPEC = st.fixed_dictionaries({
    "N": st.integers(1, 8), "V": st.integers(2, 24), "ignored": st.floats(0.0, 0.7),
    "regime": st.sampled_from(["normal", "large"]), "seed": st.integers(0, 2**31 - 1)})


def build_cross_entropy(spec, dtype):
    rng = _rng(spec)
    N, V = spec["N"], spec["V"]
    labels = rng.integers(0, V, N).astype(np.int64)
    drop = rng.random(N) < spec["ignored"]
    drop[rng.integers(0, N)] = False  # at least one row is kept: the mean is defined
    labels[drop] = -100
    s = 60.0 if spec["regime"] == "large" else 1.0  # large: logits ~ ±100+, a naive float32 exp overflows
    logits = rng.standard_normal((N, V)) * s + (100.0 if spec["regime"] == "large" else 0.0)
    return {"logits": _cast(logits, dtype), "labels": labels,
            "grad_output": _cast(np.array(rng.uniform(0.5, 2.0)), dtype)}


# ------------------------------------------------------------------------------------------------
# 4-bit and the budget (exact)
# ------------------------------------------------------------------------------------------------
QUANTIZE_SPEC = st.fixed_dictionaries({
    "n": st.integers(1, 300), "blocksize": st.sampled_from([32, 64, 128]), "quant_type": st.sampled_from(["nf4", "fp4"]),
    "zero_block": st.booleans(), "seed": st.integers(0, 2**31 - 1)})


def build_quantize_4bit(spec, _dtype=None):
    """weight (n,) float32: normal values, with every code value and every midpoint between
    neighbouring code values planted at exact multiples of a block's absmax (the tie rule)."""
    rng = _rng(spec)
    n, bs = spec["n"], spec["blocksize"]
    w = rng.standard_normal(n).astype(np.float32)
    code = np.sort(get_4bit_code(spec["quant_type"]).astype(np.float64))
    planted = np.concatenate([code, (code[1:] + code[:-1]) / 2])  # 16 values + 15 midpoints, in [-1, 1]
    block0 = min(n, bs)
    if block0 >= 2:
        w[0] = 1.0  # the block's absmax is exactly 1: planted values are their own scaled values
        k = min(block0 - 1, planted.size)
        w[1:1 + k] = rng.permutation(planted)[:k].astype(np.float32)
    if spec["zero_block"] and n > bs:
        w[bs:min(n, 2 * bs)] = 0.0  # a block of zeros: absmax 0, floored
    return {"weight": w, "blocksize": int(bs), "quant_type": spec["quant_type"]}


DEQUANTIZE_SPEC = st.fixed_dictionaries({
    "n": st.integers(1, 300), "blocksize": st.sampled_from([32, 64, 128]), "quant_type": st.sampled_from(["nf4", "fp4"]),
    "two_d": st.booleans(), "seed": st.integers(0, 2**31 - 1)})


def build_dequantize_4bit(spec, _dtype=None):
    rng = _rng(spec)
    n, bs = spec["n"], spec["blocksize"]
    m = (n + 1) // 2
    packed = rng.integers(0, 256, m).astype(np.uint8)
    packed[: min(m, 256)] = rng.permutation(256)[: min(m, 256)]  # every byte (both nibbles' codes)
    nb = -(-n // bs)
    absmax = rng.uniform(0.01, 4.0, nb).astype(np.float32)
    shape = (n,)
    if spec["two_d"]:
        rows = next(d for d in (4, 3, 2, 1) if n % d == 0)
        shape = (rows, n // rows)
    return {"packed": packed, "absmax": absmax, "blocksize": int(bs), "quant_type": spec["quant_type"],
            "shape": shape}


@st.composite
def _budget_spec(draw):
    total = draw(st.integers(2, 400))
    tinit = draw(st.integers(0, total - 1))
    tfinal = draw(st.integers(0, total - tinit - 1))  # PEFT requires tinit < total_step - tfinal
    target = draw(st.integers(0, 500))
    init = target + draw(st.integers(0, 2000))
    step = draw(st.one_of(st.integers(0, total), st.sampled_from([tinit, tinit + 1, total - tfinal,
                                                                     total - tfinal + 1])))
    return {"step": step, "init_budget": init, "target_budget": target, "tinit": tinit, "tfinal": tfinal,
            "total_step": total}


def build_adalora_budget(spec, _dtype=None):
    return dict(spec)


STRATEGIES = {
    "lora": _linear_spec(), "dora": _linear_spec(), "adalora": _linear_spec(ranknum=st.sampled_from([1, 2, 4, 8])),
    "rosa": _linear_spec(density=st.sampled_from([0.0, 0.1, 0.3, 0.6])),
    "attention": ATTENTION_SPEC, "rmsnorm": RMSNORM_SPEC, "rope": ROPE_SPEC, "swiglu": SWIGLU_SPEC,
    "cross_entropy": CROSS_ENTROPY_SPEC, "quantize_4bit": QUANTIZE_SPEC, "dequantize_4bit": DEQUANTIZE_SPEC,
    "adalora_budget": _budget_spec(),
}
BUILDERS = {
    "lora": build_lora, "dora": build_dora, "adalora": build_adalora, "rosa": build_rosa,
    "attention": build_attention, "rmsnorm": build_rmsnorm, "rope": build_rope, "swiglu": build_swiglu,
    "cross_entropy": build_cross_entropy, "quantize_4bit": build_quantize_4bit,
    "dequantize_4bit": build_dequantize_4bit, "adalora_budget": build_adalora_budget,
}


def make_case(function: str, dtype: str, spec: dict) -> dict:
    """The keyword arguments of ``function`` for ``spec`` in ``dtype``: what a counterexample
    prints, so that ``your_module.function(**make_case(...))`` reproduces it."""
    if function not in BUILDERS:
        raise ValueError(f"unknown conformance function {function!r}; known: {sorted(BUILDERS)}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    return BUILDERS[function](spec, dtype)
