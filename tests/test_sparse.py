"""spectral_peft.sparse: CSR storage, sp_add, SpMM and the three SDDMMs against dense NumPy products.

Expected values are dense products written out here with NumPy (and scipy.sparse's own CSR
constructor for the index arrays), never computed by the code under test.
"""
import numpy as np
import pytest
import scipy.sparse
from hypothesis import example, given
from hypothesis import strategies as st

from spectral_peft.backend import blas_threads, get_backend
from spectral_peft.sparse import (CSR, SddmmPlan, sddmm, sddmm_auto, sddmm_dense, sddmm_planned, sp_add, spmm,
                                  spmm_t)
from spectral_peft.testing import assert_close

SDDMMS = {"gather": sddmm, "dense": sddmm_dense, "planned": sddmm_planned, "auto": sddmm_auto}


def random_mask(rng, shape, density):
    """Exactly int(density·numel) entries, uniformly placed."""
    k = int(density * shape[0] * shape[1])
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    flat[rng.choice(flat.size, size=k, replace=False)] = True
    return flat.reshape(shape)


def clustered_mask(rng, shape, n_rows, n_cols, scatter):
    """Entries concentrated in a few rows and a few columns, plus a few scattered ones: the shape of
    gradient-chosen supports (so the planned SDDMM builds both kinds of block and gathers the rest)."""
    m = np.zeros(shape, dtype=bool)
    rows = rng.choice(shape[0], n_rows, replace=False)
    cols = rng.choice(shape[1], n_cols, replace=False)
    m[rows, :] = rng.random((n_rows, shape[1])) < 0.8
    m[:, cols] |= rng.random((shape[0], n_cols)) < 0.7
    m |= rng.random(shape) < scatter
    return m


def masked_dense(dy, x, mask):
    """(dyᵀx) read on the mask in row-major order, written with plain NumPy."""
    G = dy.T @ x
    r, c = np.nonzero(mask)
    return G[r, c]


@given(d_out=st.integers(1, 9), d_in=st.integers(1, 9), N=st.integers(1, 7),
       density=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)), seed=st.integers(0, 2**16))
def test_csr_from_mask_matches_scipy(d_out, d_in, N, density, seed):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, (d_out, d_in), density)
    S = CSR.from_mask(mask)
    ref = scipy.sparse.csr_matrix(mask)
    assert S.nnz == int(density * d_out * d_in)
    np.testing.assert_array_equal(S.indptr, ref.indptr)
    np.testing.assert_array_equal(S.indices, ref.indices)
    np.testing.assert_array_equal(S.mask(), mask)
    assert np.all(S.values == 0)
    # rows by nnz descending, ties by row index (peft-rosa's row_idx)
    counts = mask.sum(1)
    expected = sorted(range(d_out), key=lambda i: (-counts[i], i))
    np.testing.assert_array_equal(S.row_idx, expected)


def test_csr_rejects_bad_structure():
    v = np.zeros(2)
    with pytest.raises(ValueError, match="indptr must have shape"):
        CSR(v, np.array([0, 2]), np.array([0, 1]), (2, 3))
    with pytest.raises(ValueError, match="rise from 0"):
        CSR(v, np.array([0, 1, 3]), np.array([0, 1]), (2, 3))
    with pytest.raises(ValueError, match="column indices must lie"):
        CSR(v, np.array([0, 1, 2]), np.array([0, 3]), (2, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        CSR(v, np.array([0, 2, 2]), np.array([1, 1]), (2, 3))
    with pytest.raises(ValueError, match="2-D"):
        CSR.from_mask(np.ones(3, dtype=bool))


@given(d_out=st.integers(1, 8), d_in=st.integers(1, 8), N=st.integers(1, 6),
       density=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)), seed=st.integers(0, 2**16))
@example(d_out=5, d_in=4, N=3, density=0.0, seed=0)
@example(d_out=5, d_in=4, N=3, density=1.0, seed=0)
def test_sddmm_equals_masked_dense_product(d_out, d_in, N, density, seed):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, (d_out, d_in), density)
    S = CSR.from_mask(mask)
    dy = rng.standard_normal((N, d_out))
    x = rng.standard_normal((N, d_in))
    dy0, x0 = dy.copy(), x.copy()
    expected = masked_dense(dy, x, mask)
    for name, f in SDDMMS.items():
        assert_close(f(dy, x, S), expected, f"sddmm[{name}]", rtol=1e-12)
    np.testing.assert_array_equal(dy, dy0)
    np.testing.assert_array_equal(x, x0)


# every path of the planned SDDMM, forced: (path, rest_method); small costs so that tiny supports get blocks
PATHS = [("dense", None), ("blocked", "transposed"), ("blocked", "chunked"), ("gather", "transposed"),
         ("gather", "chunked"), ("auto", None)]


def forced_plan(S, path, rest_method):
    return SddmmPlan(S, path=path, rest_method=rest_method, gather_cost=8.0, chunk_gather_cost=8.0, block_cost=0.0,
                     column_cost=0.0)


@pytest.mark.parametrize("kind", ["clustered", "random", "dense"])
def test_planned_sddmm_equals_canonical(device, kind):
    """The fast SDDMM's every path against the masked dense product, on supports that exercise
    each of them (float64, rtol 1e-12: only the summation order differs)."""
    be = get_backend(device, "float64")
    rng = np.random.default_rng(3)
    shape, N = (64, 48), 40
    if kind == "clustered":
        mask = clustered_mask(rng, shape, n_rows=4, n_cols=3, scatter=0.003)
    elif kind == "random":
        mask = random_mask(rng, shape, 0.004)
    else:
        mask = random_mask(rng, shape, 0.6)
    S = CSR.from_mask(be.asarray(mask))
    dy_h = rng.standard_normal((N, shape[0]))
    x_h = rng.standard_normal((N, shape[1]))
    dy, x = be.asarray(dy_h), be.asarray(x_h)
    expected = masked_dense(dy_h, x_h, mask)
    if kind == "clustered":  # a row block, a column block and gathers
        plan = forced_plan(S, "blocked", None)
        assert len(plan.blocks) == 2 and plan.rest.shape[0] > 0 and not plan.use_dense
    for path, rest_method in PATHS:
        plan = forced_plan(S, path, rest_method)
        assert plan.path == path or path == "auto"
        assert plan.use_dense == (plan.path == "dense")
        if rest_method is not None and plan.rest.shape[0]:
            assert plan.rest_method == rest_method
        assert_close(sddmm_planned(dy, x, S, plan), expected, f"sddmm_planned[{kind}, {path}, {rest_method}]",
                     rtol=1e-12)
    never_dense = SddmmPlan(S, dense_margin=None)  # never forms the dense product
    assert not never_dense.use_dense
    for R, C, _, _ in never_dense.blocks:  # None: the whole dimension
        size = (shape[0] if R is None else len(R)) * (shape[1] if C is None else len(C))
        assert size < shape[0] * shape[1] and (R is not None or C is not None)
    assert_close(sddmm_planned(dy, x, S, never_dense), expected, "sddmm_planned[never dense]", rtol=1e-12)
    assert_close(sddmm(dy, x, S), expected, f"sddmm[{kind}]", rtol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_sddmm_plan_chooses_the_path_by_structure(threads):
    """The default plan's choice at d = 256, under 1 and 2 BLAS threads: the dense product on a dense
    or a uniformly random 10 % support, a gather on a random 0.1 % one, blocks on rows and columns
    that hold all the entries."""
    rng = np.random.default_rng(0)
    shape = (256, 256)
    with blas_threads(threads):
        assert SddmmPlan(CSR.from_mask(random_mask(rng, shape, 0.5))).path == "dense"
        assert SddmmPlan(CSR.from_mask(random_mask(rng, shape, 0.1))).path == "dense"
        assert SddmmPlan(CSR.from_mask(random_mask(rng, shape, 0.001))).path == "gather"
        m = np.zeros(shape, dtype=bool)
        m[:20, :30] = True  # 600 entries of 65536 (0.9 %), in 20 rows × 30 columns
        plan = SddmmPlan(CSR.from_mask(m))
        assert plan.path == "blocked" and plan.covered == 1.0


def test_dense_path_workspace_is_reused_safely():
    """The dense path keeps its product's buffer between calls: a second call with other inputs
    (and another dtype) gives that call's values, and the first result is not overwritten."""
    rng = np.random.default_rng(5)
    mask = random_mask(rng, (16, 12), 0.5)
    S = CSR.from_mask(mask)
    plan = SddmmPlan(S, path="dense")
    dy1, x1, dy2, x2 = (rng.standard_normal(shape) for shape in ((7, 16), (7, 12), (9, 16), (9, 12)))
    got1 = sddmm_planned(dy1, x1, S, plan)
    got2 = sddmm_planned(dy2, x2, S, plan)
    assert_close(got1, masked_dense(dy1, x1, mask), "first call", rtol=1e-12)
    assert_close(got2, masked_dense(dy2, x2, mask), "second call", rtol=1e-12)
    got3 = sddmm_planned(dy1.astype(np.float32), x1.astype(np.float32), S, plan)
    assert got3.dtype == np.float32
    assert_close(got3, masked_dense(dy1, x1, mask), "float32 call", rtol=1e-5)


@given(d_out=st.integers(1, 12), d_in=st.integers(1, 12), N=st.integers(1, 9),
       density=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)), seed=st.integers(0, 2**16),
       rows_only=st.booleans())
@example(d_out=5, d_in=4, N=3, density=0.0, seed=0, rows_only=False)
@example(d_out=12, d_in=12, N=9, density=1.0, seed=0, rows_only=False)
def test_every_sddmm_path_equals_masked_dense_on_any_support(d_out, d_in, N, density, seed, rows_only):
    """Hypothesis on supports (random, or whole rows: clustered), every forced path, float64
    (rtol 1e-12) and float32 (rtol 1e-5 of the largest |value|: the suite's float32 tolerance)."""
    rng = np.random.default_rng(seed)
    if rows_only:
        mask = np.zeros((d_out, d_in), dtype=bool)
        mask[rng.random(d_out) < density] = True
    else:
        mask = random_mask(rng, (d_out, d_in), density)
    dy = rng.standard_normal((N, d_out))
    x = rng.standard_normal((N, d_in))
    expected = masked_dense(dy, x, mask)
    for dtype, rtol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        S = CSR.from_mask(mask, dtype=dtype)
        dyc, xc = dy.astype(dtype), x.astype(dtype)
        for path, rest_method in PATHS:
            got = sddmm_planned(dyc, xc, S, forced_plan(S, path, rest_method))
            assert got.dtype == dtype and got.shape == (mask.sum(),)
            assert_close(got, expected.astype(dtype), f"sddmm_planned[{path}, {rest_method}, {dtype.__name__}]",
                         rtol=rtol, atol=rtol * max(1.0, float(np.abs(expected).max(initial=0.0))))
        assert_close(sddmm_planned(dyc, xc, S), expected.astype(dtype), "sddmm_planned[default]", rtol=rtol,
                     atol=rtol * max(1.0, float(np.abs(expected).max(initial=0.0))))


@given(d_out=st.integers(1, 8), d_in=st.integers(1, 8), N=st.integers(1, 6),
       density=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)), seed=st.integers(0, 2**16))
def test_spmm_and_sp_add_equal_dense_products(d_out, d_in, N, density, seed):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, (d_out, d_in), density)
    S = CSR.from_mask(mask)
    S.values[...] = rng.standard_normal(S.nnz)
    S_dense = np.zeros((d_out, d_in))
    S_dense[np.nonzero(mask)] = S.values  # row-major order of the entries
    x = rng.standard_normal((2, N, d_in))
    dy = rng.standard_normal((2, N, d_out))
    W = rng.standard_normal((d_out, d_in))
    assert_close(spmm(S, x), x @ S_dense.T, "spmm", rtol=1e-12)
    assert_close(spmm_t(S, dy), dy @ S_dense, "spmm_t", rtol=1e-12)
    assert_close(sp_add(W, S), W + S_dense, "sp_add", rtol=1e-12)
    assert_close(S.to_dense(), S_dense, "to_dense", rtol=0, atol=0)


def test_float32_sddmm_and_spmm(device):
    be = get_backend(device, "float32")
    rng = np.random.default_rng(0)
    mask = clustered_mask(rng, (32, 24), 3, 2, 0.01)
    S = CSR.from_mask(be.asarray(mask), dtype=np.float32)
    dy = rng.standard_normal((16, 32))
    x = rng.standard_normal((16, 24))
    expected = masked_dense(dy, x, mask)
    for name, f in SDDMMS.items():
        got = f(be.asarray(dy), be.asarray(x), S)
        assert got.dtype == np.float32
        assert_close(got, expected, f"sddmm[{name}] float32", rtol=1e-4)


def test_shape_errors():
    S = CSR.from_mask(np.eye(3, 4, dtype=bool))
    with pytest.raises(ValueError, match="do not fit the support"):
        sddmm(np.zeros((2, 4)), np.zeros((2, 4)), S)
    with pytest.raises(ValueError, match="share N"):
        sddmm(np.zeros((2, 3)), np.zeros((3, 4)), S)
    with pytest.raises(ValueError, match=r"spmm: x must be \(\.\.\., 4\)"):
        spmm(S, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="sp_add"):
        sp_add(np.zeros((4, 3)), S)
