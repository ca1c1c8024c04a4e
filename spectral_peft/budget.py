"""What the budgets share: an exact top-k with a deterministic tie-break.

AdaLoRA keeps exactly b(t) singular-value triplets across all layers; RoSA keeps exactly
int(density · numel) entries per layer. Both select "the k largest scores", and both need the
same answer to the question PEFT leaves open: what happens to scores tied at the threshold.

Tie-break rule (used by every budget in the engine): order entries by score, descending; among
equal scores the entry with the SMALLER flat index ranks first. Flat indices follow the row-major
order of the array handed in (for AdaLoRA, the layers in model order, then the triplet index;
for RoSA, the row-major position in the (d_out, d_in) matrix). So exactly k entries are kept,
always, and the same inputs give the same selection on every backend.

Shapes: scores (n,) or any shape (flattened row-major); k an int with 0 <= k <= scores.size.
"""
from __future__ import annotations

from .backend import get_xp, host_scalar


def topk_indices(scores, k: int):
    """Flat indices of the k largest ``scores`` (ties -> smaller index first), in rank order.

    Raises ValueError for k outside [0, size] or for NaN scores (a NaN has no rank).
    """
    xp = get_xp(scores)
    flat = scores.reshape(-1)
    n = flat.size
    if not isinstance(k, (int,)) and not hasattr(k, "__index__"):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, {n}] (the number of scores), got {k}")
    if host_scalar(xp.isnan(flat).any(), "input check"):
        raise ValueError("scores contain NaN; a budget cannot rank them")
    if k == 0:
        return xp.zeros(0, dtype=xp.int64)
    # lexsort sorts by the LAST key first: primary key -score (descending score),
    # secondary key the flat index (ascending) -> deterministic tie-break. The keys go in as one
    # (2, n) float64 array (CuPy's lexsort takes only that form; float64 holds indices exactly).
    keys = xp.stack([xp.arange(n, dtype=xp.float64), -flat.astype(xp.float64)])
    order = xp.lexsort(keys)
    return order[:k]


def topk_mask(scores, k: int):
    """Boolean mask of ``scores``' shape with exactly k True entries: the top-k by topk_indices."""
    xp = get_xp(scores)
    mask = xp.zeros(scores.size, dtype=bool)
    mask[topk_indices(scores, k)] = True
    return mask.reshape(scores.shape)


def threshold_mask_le(scores, k_prune: int):
    """PEFT's rule, for parity: threshold = the k_prune-th smallest score (kthvalue), and every
    entry with score <= threshold is pruned. With ties at the threshold MORE than k_prune entries
    are pruned. Returns the keep mask (True = kept). k_prune = 0 prunes nothing."""
    xp = get_xp(scores)
    flat = scores.reshape(-1)
    if not 0 <= int(k_prune) <= flat.size:
        raise ValueError(f"k_prune must lie in [0, {flat.size}], got {k_prune}")
    if int(k_prune) == 0:
        return xp.ones(scores.shape, dtype=bool)
    threshold = xp.sort(flat)[int(k_prune) - 1]
    return (scores > threshold)
