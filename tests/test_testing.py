"""spectral_peft.testing.assert_close: the comparison every other test relies on."""
import numpy as np
import pytest

from spectral_peft.testing import assert_close, errors


def test_close_arrays_pass_and_far_ones_name_the_tensor():
    e = np.array([1.0, -2.0, 3.0])
    assert_close(e * (1 + 1e-12), e, "t", rtol=1e-10)
    with pytest.raises(AssertionError, match=r"^dW: max abs error 3\.000e-03"):
        assert_close(e + np.array([0, 0, 3e-3]), e, "dW", rtol=1e-10)


def test_scale_relative_by_default():
    """atol defaults to rtol·max|e|: a near-zero entry does not demand impossible relative accuracy."""
    e = np.array([1.0, 1e-14])
    assert_close(e + np.array([0.0, 1e-12]), e, "t", rtol=1e-10)  # elementwise rel 100, within 1e-10·1
    with pytest.raises(AssertionError, match="t: "):
        assert_close(e + np.array([0.0, 1e-12]), e, "t", rtol=1e-10, atol=0.0)


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match=r"y: shape \(2,\) != expected \(3,\)"):
        assert_close(np.zeros(2), np.zeros(3), "y", rtol=1e-10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_on_both_sides_fails_by_default(bad):
    a = np.array([1.0, bad])
    with pytest.raises(AssertionError, match=r"g: 1 non-finite value\(s\) in actual, 1 in expected"):
        assert_close(a, a.copy(), "g", rtol=1e-10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_on_one_side_fails_even_with_equal_nan(bad):
    with pytest.raises(AssertionError, match="g: non-finite values differ"):
        assert_close(np.array([1.0, bad]), np.array([1.0, 2.0]), "g", rtol=1e-10, equal_nan=True)
    with pytest.raises(AssertionError, match=r"g: 0 non-finite value\(s\) in actual, 1 in expected"):
        assert_close(np.array([1.0, 2.0]), np.array([1.0, bad]), "g", rtol=1e-10)


def test_equal_nan_compares_positions_and_signs():
    e = np.array([np.nan, np.inf, -np.inf, 2.0])
    assert_close(e.copy(), e, "g", rtol=1e-10, equal_nan=True)
    with pytest.raises(AssertionError, match="g: non-finite values differ"):
        assert_close(np.array([np.nan, -np.inf, -np.inf, 2.0]), e, "g", rtol=1e-10, equal_nan=True)
    with pytest.raises(AssertionError, match="g: non-finite values differ"):
        assert_close(np.array([np.inf, np.nan, -np.inf, 2.0]), e, "g", rtol=1e-10, equal_nan=True)
    with pytest.raises(AssertionError, match="g: max abs error 1.000e-01"):  # the finite rest still counts
        assert_close(np.array([np.nan, np.inf, -np.inf, 2.1]), e, "g", rtol=1e-10, equal_nan=True)


def test_errors_reports_max_abs_and_rel():
    ab, rel = errors(np.array([1.0, 2.5]), np.array([1.0, 2.0]))
    assert ab == 0.5 and rel == 0.25
