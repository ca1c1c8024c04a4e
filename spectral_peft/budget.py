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


# ------------------------------------------------------------------------------------------------
# Matching a trainable-parameter budget (the main job's equal-budget comparison)
# ------------------------------------------------------------------------------------------------
class BudgetUnreachable(ValueError):
    """No size of a method comes within reach of the budget (its fixed part alone exceeds it)."""


def match_budget(recipe, options, shapes: dict[str, tuple[int, int]], budget: int, tolerance: float) -> tuple:
    """The size knob of ``recipe`` whose trainable count is nearest ``budget``: (size, count).

    Counts come from the config's closed formula (``parameter_count(shapes)``, shapes
    ``{path: (d_out, d_in)}`` of the adapted linears); no model is built. A knob fixed by the run's
    options (``recipe.preset``: AdaLoRA's --init_r, RoSA's --d) is taken as given.

    - "r" / "init_r": the integer nearest the budget (counts grow with r). When it is off by more
      than ``tolerance`` and the recipe allows ``mixed_ranks`` (DoRA's magnitudes, LoRA-FA's B-only
      count), modules are raised from r to r + 1 through PEFT's rank_pattern, largest steps first,
      while that brings the count closer: the size is then (r, rank_pattern).
    - "d": the density filling what the rest of the adapter leaves, nudged up by half an entry
      while that brings the count nearer (int(d·numel) floors per layer).
    """
    def count(size) -> int:
        return recipe.make_config(options, size).parameter_count(shapes)

    preset = getattr(options, recipe.preset, None) if recipe.preset else None
    if preset is not None:
        return preset, count(preset)
    if recipe.knob == "d":
        return _match_density(count, shapes, budget)
    # virtual tokens add >= 1 parameter each: the count reaches the budget by size = budget
    lo, hi = 1, budget if recipe.knob == "num_virtual_tokens" else max(8 * options.r, 16)
    while lo < hi:  # the smallest r with count(r) >= budget
        mid = (lo + hi) // 2
        if count(mid) >= budget:
            hi = mid
        else:
            lo = mid + 1
    best = min((k for k in (lo - 1, lo) if k >= 1), key=lambda k: (abs(count(k) - budget), k))
    if abs(count(best) - budget) <= tolerance * budget or not recipe.mixed_ranks or lo - 1 < 1:
        return best, count(best)
    return _mixed_ranks(recipe, options, shapes, lo - 1, budget, count)


def _match_density(count, shapes: dict, budget: int) -> tuple[float, int]:
    numel = sum(a * b for a, b in shapes.values())
    # the count without sparse values, at a density too small to keep an entry in any layer (a
    # schedule that trains sparse values refuses d = 0)
    fixed = count(0.5 / max(a * b for a, b in shapes.values()))
    if fixed >= budget:
        raise BudgetUnreachable(f"its adapter without sparse values already has {fixed:,} trainable "
                                f"parameters, at or over the budget {budget:,}; lower the rank (--rosa_r)")
    d = (budget - fixed) / numel
    while d < 1.0 and abs(count(min(1.0, d + 0.5 / numel)) - budget) < abs(count(d) - budget):
        d = min(1.0, d + 0.5 / numel)
    return float(d), count(d)


def _mixed_ranks(recipe, options, shapes: dict, r: int, budget: int, count) -> tuple:
    """From rank r (below the budget), raise modules to r + 1 while the count nears the budget."""
    def one(path, rank) -> int:
        return recipe.make_config(options, rank).parameter_count({path: shapes[path]})

    steps = sorted(((one(p, r + 1) - one(p, r), p) for p in shapes), reverse=True)
    total, pattern = count(r), {}
    for delta, path in steps:
        if abs(total + delta - budget) < abs(total - budget):
            pattern[path] = r + 1  # PEFT matches keys as (.*\.)?(key)$: the full path is exact
            total += delta
    size = (r, pattern) if pattern else r
    return size, count(size)
