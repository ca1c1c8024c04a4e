"""The shared exact top-k: exactly k kept, the documented tie-break, and PEFT's `<=` rule for parity."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spectral_peft.backend import get_backend, to_host
from spectral_peft.budget import threshold_mask_le, topk_indices, topk_mask

# Scores drawn from a small pool of values so that ties are frequent.
tied_scores = hnp.arrays(np.float64, st.integers(1, 40), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]))


@given(scores=tied_scores, data=st.data())
def test_topk_keeps_exactly_k(scores, data):
    k = data.draw(st.integers(0, scores.size))
    mask = topk_mask(scores, k)
    assert int(mask.sum()) == k


@given(scores=tied_scores, data=st.data())
def test_topk_kept_entries_dominate_and_ties_prefer_smaller_index(scores, data):
    k = data.draw(st.integers(1, scores.size))
    mask = topk_mask(scores, k)
    kept, dropped = scores[mask], scores[~mask]
    if dropped.size:
        assert kept.min() >= dropped.max()
        # Among entries tied at the boundary value, the kept ones have smaller indices than the dropped ones.
        boundary = kept.min()
        kept_idx = np.flatnonzero(mask & (scores == boundary))
        dropped_idx = np.flatnonzero(~mask & (scores == boundary))
        if dropped_idx.size:
            assert kept_idx.max() < dropped_idx.min()


def test_topk_order_by_hand():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert topk_indices(scores, 2).tolist() == [1, 2]
    assert topk_indices(scores, 4).tolist() == [1, 2, 4, 3]
    assert topk_mask(scores.reshape(1, 5), 3).tolist() == [[False, True, True, False, True]]


def test_topk_rejects_bad_k_and_nan():
    with pytest.raises(ValueError, match=r"k must lie in \[0, 3\]"):
        topk_mask(np.zeros(3), 4)
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(np.array([1.0, np.nan]), 1)


@given(scores=tied_scores, data=st.data())
def test_peft_rule_prunes_all_ties_at_threshold(scores, data):
    k_prune = data.draw(st.integers(0, scores.size))
    keep = threshold_mask_le(scores, k_prune)
    if k_prune == 0:
        assert keep.all()
        return
    threshold = np.sort(scores)[k_prune - 1]
    assert np.array_equal(keep, scores > threshold)
    # PEFT's rule can keep fewer than size - k_prune; the exact rule never does.
    assert int(keep.sum()) <= scores.size - k_prune
    assert int(topk_mask(scores, scores.size - k_prune).sum()) == scores.size - k_prune


def test_topk_same_answer_on_every_backend(device):
    rng = np.random.default_rng(0)
    host = rng.integers(0, 4, size=200).astype(np.float64)
    b = get_backend(device, "float64")
    expected = topk_mask(host, 57)
    np.testing.assert_array_equal(to_host(topk_mask(b.asarray(host), 57)), expected)
