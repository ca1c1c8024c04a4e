"""Rotary position embedding (RoPE, Su et al. 2021) in Hugging Face's rotate_half layout.

Shape legend: B batch, H heads, T sequence, hd head width, D <= hd the rotated width (even;
D = int(hd · partial_rotary_factor)), h = D/2 frequencies.

Frequencies (rope_init): inv_freq_i = θ^(-2i/D), i = 0..h-1, then rescaled by the rope type
(below); attention_scaling multiplies cos and sin (YaRN's mscale, 1 otherwise).
Angles (rope_cos_sin): φ[b, t, i] = position_ids[b, t] · inv_freq_i;
    cos = [cos φ | cos φ] · a,  sin = [sin φ | sin φ] · a        (B, T, D), HF's emb = cat(freqs, freqs)
Rotation (rope_forward), on the first D channels of x (B, H, T, hd), split in halves x1, x2:
    out1 = x1 ⊙ c1 - x2 ⊙ s1,   out2 = x2 ⊙ c2 + x1 ⊙ s2         (= x cos + rotate_half(x) sin)
where c1, c2 (s1, s2) are the two halves of cos (sin); channels D.. pass through unchanged.
The rotation is linear in x, so the backward is its transpose:
    dx1 = d1 ⊙ c1 + d2 ⊙ s2,    dx2 = d2 ⊙ c2 - d1 ⊙ s1.
The cache is (cos, sin) alone: the backward needs no activation.

Rope types (transformers' modeling_rope_utils, formulas restated), with rope_parameters keys:
- "default":  rope_theta.
- "linear":   factor; inv_freq /= factor (position interpolation).
- "dynamic":  factor; NTK-aware: θ' = θ · (factor · L/L0 - (factor - 1))^(D/(D-2)) with
              L = max(seq_len, L0), L0 = max_position_embeddings: θ' = θ for every L <= L0, so
              within the model's range (which the engine enforces) it equals "default".
- "llama3":   factor, low_freq_factor, high_freq_factor, original_max_position_embeddings L0:
              wavelength λ = 2π/inv_freq; λ > L0/low: inv_freq/factor; λ < L0/high: unchanged;
              between: (1 - s) inv_freq/factor + s inv_freq, s = (L0/λ - low)/(high - low).
- "yarn":     factor, original_max_position_embeddings L0, optional beta_fast (32), beta_slow (1),
              attention_factor, mscale, mscale_all_dim, truncate (True): a linear ramp over the
              frequency index between the correction dims of beta_fast and beta_slow blends
              interpolation (inv_freq/factor) and extrapolation (inv_freq); attention_scaling =
              attention_factor, else mscale(factor, mscale)/mscale(factor, mscale_all_dim) when both are
              set, else 0.1 ln(factor) + 1 (mscale(f, m) = 0.1 m ln f + 1 for f > 1, else 1).
Every type also accepts partial_rotary_factor (D = int(hd · partial_rotary_factor)).
Derivation of the backward: docs/llama.md.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_xp

_COMMON_KEYS = {"rope_type", "rope_theta", "partial_rotary_factor"}
ROPE_KEYS = {
    "default": (set(), set()),
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "llama3": ({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"}),
}  # rope_type -> (required keys, optional keys), besides rope_theta and partial_rotary_factor


def check_rope_parameters(params: dict, head_dim: int) -> None:
    """Raise ValueError naming the rope_parameters key that is missing, unknown or out of range."""
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be a dict with rope_type and rope_theta, got {params!r}")
    kind = params.get("rope_type", "default")
    if kind not in ROPE_KEYS:
        raise ValueError(f"rope_parameters.rope_type = {kind!r} is not supported; supported: {sorted(ROPE_KEYS)}")
    required, optional = ROPE_KEYS[kind]
    for key in sorted(required):
        if params.get(key) is None:
            raise ValueError(f"rope_parameters.{key} is required by rope_type {kind!r}")
    unknown = sorted(set(params) - _COMMON_KEYS - required - optional)
    if unknown:
        raise ValueError(f"rope_parameters.{unknown[0]} is not used by rope_type {kind!r} (it takes "
                         f"{sorted(_COMMON_KEYS | required | optional)}): refused rather than ignored")
    theta = params.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 1:
        raise ValueError(f"rope_parameters.rope_theta must be a number > 1, got {theta!r}")
    D = rotary_dim(params, head_dim)
    if D < 2 or D % 2:
        raise ValueError(f"rope: the rotated width int(head_dim · partial_rotary_factor) = {D} must be even and >= 2 "
                         f"(head_dim = {head_dim}, partial_rotary_factor = {params.get('partial_rotary_factor', 1.0)})")
    if kind == "dynamic" and D == 2:
        raise ValueError("rope_parameters.rope_type 'dynamic' rescales rope_theta by a power D/(D-2), undefined "
                         f"for a rotated width D = 2 (head_dim = {head_dim}): use a head_dim >= 4 or another rope_type")
    factor = params.get("factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0):
        raise ValueError(f"rope_parameters.factor must be a number > 0, got {factor!r}")


def rotary_dim(params: dict, head_dim: int) -> int:
    """D = int(head_dim · partial_rotary_factor), the width RoPE rotates."""
    prf = params.get("partial_rotary_factor", 1.0)
    if isinstance(prf, bool) or not isinstance(prf, (int, float)) or not 0 < prf <= 1:
        raise ValueError(f"rope_parameters.partial_rotary_factor must be in (0, 1], got {prf!r}")
    return int(head_dim * prf)


def rope_init(params: dict, head_dim: int, max_position_embeddings: int, seq_len: int | None = None):
    """(inv_freq (D/2,) float64 host array, attention_scaling float) for HF ``rope_parameters``.

    seq_len: the sequence length the "dynamic" type rescales for (default max_position_embeddings).
    """
    check_rope_parameters(params, head_dim)
    kind = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", 10000.0))
    D = rotary_dim(params, head_dim)
    if kind == "dynamic":
        L0, f = max_position_embeddings, float(params["factor"])
        L = max(seq_len or L0, L0)
        theta = theta * (f * L / L0 - (f - 1)) ** (D / (D - 2))
    inv_freq = 1.0 / theta ** (np.arange(0, D, 2, dtype=np.float64) / D)  # (h,)
    if kind == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, params), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, theta, D, params)
    return inv_freq, 1.0


def _llama3(inv_freq, p: dict):
    f, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    L0 = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    out = np.where(wavelen > L0 / low, inv_freq / f, inv_freq)
    smooth = (L0 / wavelen - low) / (high - low)
    medium = (wavelen >= L0 / high) & (wavelen <= L0 / low)
    return np.where(medium, (1 - smooth) * out / f + smooth * out, out)


def _yarn(inv_freq, theta: float, D: int, p: dict):
    f = float(p["factor"])
    L0 = p["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scaling = p.get("attention_factor")
    if scaling is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        scaling = mscale(f, m) / mscale(f, m_all) if (m and m_all) else mscale(f)

    def correction_dim(rotations):  # the index whose wavelength makes `rotations` turns over L0
        return D * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(D // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep inv_freq; 0: interpolate (inv_freq / factor)
    return inv_freq / f * (1 - extrapolation) + inv_freq * extrapolation, float(scaling)


def rope_cos_sin(position_ids, inv_freq, attention_scaling: float = 1.0):
    """position_ids (B, T) int, inv_freq (h,) -> (cos, sin), each (B, T, D = 2h), in inv_freq's dtype:
    cos = [cos φ | cos φ] · a with φ = position_ids ⊗ inv_freq (HF's emb = cat(freqs, freqs))."""
    xp = get_xp(inv_freq)
    if position_ids.ndim != 2 or position_ids.dtype.kind not in "iu":
        raise ValueError(f"rope_cos_sin: position_ids must be an int array (B, T), got {position_ids.dtype} {tuple(position_ids.shape)}")
    phi = position_ids[..., None].astype(inv_freq.dtype) * inv_freq  # (B, T, h)
    emb = xp.concatenate([phi, phi], axis=-1)  # (B, T, D)
    cos, sin = xp.cos(emb), xp.sin(emb)
    if attention_scaling != 1.0:
        cos *= attention_scaling
        sin *= attention_scaling
    return cos, sin


def rope_forward(x, cos, sin):
    """out = x cos + rotate_half(x) sin on the first D channels of x.

    x (B, H, T, hd), cos, sin (B, T, D), D even, D <= hd -> out (B, H, T, hd) (a new array), cache (cos, sin).
    """
    if x.ndim != 4 or cos.ndim != 3 or cos.shape != sin.shape:
        raise ValueError(f"rope_forward: x must be (B, H, T, hd) and cos, sin (B, T, D), got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    B, H, T, hd = x.shape
    D = cos.shape[-1]
    if cos.shape[:2] != (B, T) or D % 2 or D > hd:
        raise ValueError(f"rope_forward: cos, sin must be (B, T, D) = ({B}, {T}, D) with D even and <= hd = {hd}, "
                         f"got {tuple(cos.shape)}")
    h = D // 2
    c, s = cos[:, None], sin[:, None]  # (B, 1, T, D), broadcast over the heads
    x1, x2 = x[..., :h], x[..., h:D]
    out = x.copy() if D < hd else get_xp(x).empty_like(x)  # channels D.. pass through
    # out1 = x1 c1 - x2 s1;  out2 = x2 c2 + x1 s2
    out[..., :h] = x1 * c[..., :h] - x2 * s[..., :h]
    out[..., h:D] = x2 * c[..., h:] + x1 * s[..., h:]
    return out, (cos, sin)


def rope_backward(dout, cache):
    """dx (B, H, T, hd) of out = x cos + rotate_half(x) sin: the transposed rotation."""
    cos, sin = cache
    D = cos.shape[-1]
    h = D // 2
    if dout.ndim != 4 or dout.shape[0] != cos.shape[0] or dout.shape[2] != cos.shape[1] or dout.shape[3] < D:
        raise ValueError(f"rope_backward: dout must be (B, H, T, hd) matching cos {tuple(cos.shape)}, got {tuple(dout.shape)}")
    c, s = cos[:, None], sin[:, None]
    d1, d2 = dout[..., :h], dout[..., h:D]
    dx = dout.copy() if D < dout.shape[3] else get_xp(dout).empty_like(dout)
    # out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2  =>  dx1 = d1 c1 + d2 s2,  dx2 = d2 c2 - d1 s1
    dx[..., :h] = d1 * c[..., :h] + d2 * s[..., h:]
    dx[..., h:D] = d2 * c[..., h:] - d1 * s[..., :h]
    return dx
