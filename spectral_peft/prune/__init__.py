"""Pruning of the frozen base: magnitude, Wanda and N:M masks, the sparse frozen linears (CSR and
N:M packed), calibration, and merging into a pruned base (the run's pruned-base rows: commands/prune_rows.py).

See docs/pruning.md.
"""
from .layers import PRUNED_TYPES, NMSparseLinear, SparseLinear, activation_norms, prune_linear, prune_model
from .masks import (SCORES, magnitude_mask, make_mask, method_tag, nm_mask, parse_prune_method, pruned_count, row_mask,
                    wanda_mask, wanda_scores)
from .merge import merge_and_unload_pruned, merge_pruned, off_support_fraction

__all__ = ["NMSparseLinear", "PRUNED_TYPES", "SCORES", "SparseLinear", "activation_norms", "magnitude_mask",
           "make_mask", "merge_and_unload_pruned", "merge_pruned", "method_tag", "nm_mask", "off_support_fraction",
           "parse_prune_method", "prune_linear", "prune_model", "pruned_count", "row_mask", "wanda_mask",
           "wanda_scores"]
