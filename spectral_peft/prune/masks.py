"""Which weights a pruned base keeps: magnitude, Wanda and N:M masks (docs/pruning.md).

Shape legend: W (d_out, d_in) a linear's weight (PyTorch layout); x (N, d_in) the inputs the
linear saw on calibration tokens; a (d_in,) their column norms a_j = ||x[:, j]||₂; s the sparsity
(the fraction of weights set to zero), 0 <= s < 1. Every mask is boolean (d_out, d_in), True where
the weight is KEPT.

- magnitude (unstructured, per layer): prune the k = ⌊s·d_out·d_in⌋ entries of smallest |W_ij|
  over the whole matrix (torch.nn.utils.prune.l1_unstructured with an integer amount).
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models",
  arXiv:2306.11695): score S_ij = |W_ij| · a_j, and prune the k = ⌊s·d_in⌋ entries of smallest
  score IN EACH OUTPUT ROW i (their "per output" comparison group).
- N:M (semi-structured; NVIDIA's 2:4 for sparse tensor cores): along the input axis, in each group
  of M consecutive weights W[i, gM : (g+1)M], keep the N of largest score (|W| or Wanda's S).
  The sparsity is exactly 1 − N/M; d_in must be a multiple of M.

The count k is ⌊s·n⌋ with s·n read to 1e-9 (so 0.29·100 is 29, not 28 as in floating point).
Ties are broken by position (a stable sort): the earlier entry is pruned first, so a mask is a
pure function of (scores, s). Exactly k entries are pruned; a weight that was already zero and is
kept still counts as kept.
"""
from __future__ import annotations

import math
import re

from ..backend import get_xp

SCORES = ("magnitude", "wanda")


def pruned_count(n: int, sparsity: float) -> int:
    """k = ⌊s·n⌋, the number of entries pruned out of n (s·n taken to 1e-9)."""
    check_sparsity(sparsity)
    return math.floor(sparsity * n + 1e-9)


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction of weights set to zero), got {sparsity!r}")
    return float(sparsity)


def check_nm(n: int, m: int, d_in: int | None = None) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
        raise ValueError(f"N:M sparsity needs integers 0 < N < M, got {n}:{m}")
    if d_in is not None and d_in % m:
        raise ValueError(f"N:M sparsity {n}:{m} needs d_in divisible by M={m}, got d_in={d_in}")


# --- scores -------------------------------------------------------------------------------------
def wanda_scores(W, act_norm):
    """S = |W| ⊙ a (broadcast over rows): W (d_out, d_in), a (d_in,) -> S (d_out, d_in)."""
    if act_norm.shape != (W.shape[1],):
        raise ValueError(f"wanda_scores: the activation norms must have shape ({W.shape[1]},) (d_in,), "
                         f"got {act_norm.shape}")
    xp = get_xp(W)
    return xp.abs(W) * act_norm.astype(W.dtype, copy=False)[None, :]


def scores_for(W, score: str, act_norm=None):
    """|W| ("magnitude") or Wanda's |W| ⊙ a ("wanda", needs ``act_norm``)."""
    if score == "magnitude":
        return get_xp(W).abs(W)
    if score == "wanda":
        if act_norm is None:
            raise ValueError("wanda scores need the calibration activation norms (act_norm, (d_in,))")
        return wanda_scores(W, act_norm)
    raise ValueError(f"unknown pruning score {score!r}; choose from {', '.join(SCORES)}")


# --- masks --------------------------------------------------------------------------------------
def magnitude_mask(W, sparsity: float):
    """Keep-mask (d_out, d_in): the ⌊s·d_out·d_in⌋ smallest |W| over the whole layer pruned."""
    xp = get_xp(W)
    k = pruned_count(W.size, sparsity)
    order = xp.argsort(xp.abs(W).reshape(-1), kind="stable")  # ascending |W|, ties by position
    keep = xp.ones(W.size, dtype=bool)
    keep[order[:k]] = False
    return keep.reshape(W.shape)


def row_mask(scores, sparsity: float):
    """Keep-mask (d_out, d_in): in each row, the ⌊s·d_in⌋ smallest scores pruned (Wanda's group)."""
    xp = get_xp(scores)
    k = pruned_count(scores.shape[1], sparsity)
    order = xp.argsort(scores, axis=1, kind="stable")[:, :k]  # (d_out, k) columns to prune
    keep = xp.ones(scores.shape, dtype=bool)
    keep[xp.arange(scores.shape[0])[:, None], order] = False
    return keep


def wanda_mask(W, act_norm, sparsity: float):
    """Wanda's keep-mask: per output row, prune the ⌊s·d_in⌋ smallest |W_ij|·a_j."""
    return row_mask(wanda_scores(W, act_norm), sparsity)


def nm_mask(scores, n: int, m: int):
    """Keep-mask (d_out, d_in): in each group of m consecutive inputs, the n largest scores kept."""
    d_out, d_in = scores.shape
    check_nm(n, m, d_in)
    xp = get_xp(scores)
    groups = scores.reshape(d_out, d_in // m, m)
    order = xp.argsort(groups, axis=2, kind="stable")[:, :, : m - n]  # the m−n smallest of each group
    keep = xp.ones(groups.shape, dtype=bool)
    keep[xp.arange(d_out)[:, None, None], xp.arange(d_in // m)[None, :, None], order] = False
    return keep.reshape(d_out, d_in)


def make_mask(W, score: str, sparsity: float | None = None, nm: tuple[int, int] | None = None, act_norm=None):
    """The keep-mask of one layer: N:M when ``nm`` is given (by ``score``), else unstructured at
    ``sparsity`` (magnitude: per layer; wanda: per output row)."""
    S = scores_for(W, score, act_norm)
    if nm is not None:
        return nm_mask(S, *nm)
    if score == "magnitude":
        return magnitude_mask(W, sparsity)
    return row_mask(S, sparsity)


# --- the run's option -----------------------------------------------------------------------------
_NM = re.compile(r"^(?:(magnitude|wanda)-)?(\d+):(\d+)$")


def parse_prune_method(text: str) -> tuple[str, tuple[int, int] | None]:
    """--prune_method: "magnitude", "wanda", "N:M" (Wanda-scored, as Sun et al. do), or
    "magnitude-N:M" / "wanda-N:M" -> (score, (N, M) or None)."""
    t = str(text).strip().lower()
    if t in SCORES:
        return t, None
    hit = _NM.match(t)
    if hit is None:
        raise ValueError(f"--prune_method must be 'magnitude', 'wanda', 'N:M' (e.g. '2:4', Wanda-scored) or "
                         f"'magnitude-N:M', got {text!r}")
    n, m = int(hit.group(2)), int(hit.group(3))
    check_nm(n, m)
    return hit.group(1) or "wanda", (n, m)


def method_tag(score: str, sparsity: float, nm: tuple[int, int] | None) -> str:
    """How a table names a pruned base: 'wanda50', 'magnitude30', 'wanda2:4'."""
    if nm is not None:
        return f"{score}{nm[0]}:{nm[1]}"
    pct = 100 * sparsity
    return f"{score}{pct:.0f}" if abs(pct - round(pct)) < 1e-9 else f"{score}{pct:g}"


__all__ = ["SCORES", "check_nm", "check_sparsity", "magnitude_mask", "make_mask", "method_tag", "nm_mask",
           "parse_prune_method", "pruned_count", "row_mask", "scores_for", "wanda_mask", "wanda_scores"]


def parse_sparsities(text: str | None) -> list[float]:
    """--prune: a comma list of sparsities in [0, 1) (an empty list for None)."""
    if text is None:
        return []
    out = []
    for part in str(text).split(","):
        try:
            s = float(part)
        except ValueError:
            raise ValueError(f"--prune must be a comma list of sparsities in [0, 1) (e.g. 0.5 or 0.3,0.5,0.7), "
                             f"got {text!r}") from None
        if not 0 <= s < 1:
            raise ValueError(f"--prune: each sparsity must lie in [0, 1), got {s} in {text!r}")
        out.append(s)
    if len(set(out)) != len(out):
        raise ValueError(f"--prune {text!r} names a sparsity twice")
    return out


def check_options(prune: str | None, prune_method: str) -> None:
    """Both options, and their agreement: an N:M pattern has the sparsity 1 − N/M."""
    sparsities = parse_sparsities(prune)
    _, nm = parse_prune_method(prune_method)
    if nm is not None and sparsities and any(abs(s - (1 - nm[0] / nm[1])) > 1e-9 for s in sparsities):
        raise ValueError(f"--prune_method {prune_method} fixes the sparsity at {1 - nm[0] / nm[1]:g} (1 − N/M); "
                         f"--prune {prune!r} asks otherwise")
