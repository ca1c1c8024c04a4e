"""The gpu-emulated device holds code to the installed CuPy's rules (read from ``import cupy``).

Each test pins one CuPy behaviour the emulation mirrors, against the real CuPy API where it can be
read, so the emulation cannot drift looser than CuPy: implicit host conversion, NEP-18 dispatch,
names / ndarray methods / keywords, 0-d device results, the random Generator, kernels, sparse
matrices, the backend seam, and the transfer ledger and guard.
"""
import inspect
import sys

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
import cupyx.scipy.sparse  # noqa: E402
import scipy.sparse  # noqa: E402

from spectral_peft import emulated  # noqa: E402
from spectral_peft.backend import (begin_step, end_step, get_backend, get_xp, get_xpx, host_scalar,  # noqa: E402
                                   is_device_array, to_device, to_host)
from spectral_peft.emulated import LEDGER, EmulatedArray, TransferError, api, guard  # noqa: E402
from spectral_peft.quant import dequantize_4bit, quantize_4bit  # noqa: E402
from spectral_peft.quant import blockwise as B  # noqa: E402
from spectral_peft.quant.kernels import DEQUANT_4BIT  # noqa: E402

EMU = get_backend("gpu-emulated", "float64")
xp = EMU.xp


def dev(a):
    return to_device(np.asarray(a), EMU)


# --- 1. implicit conversion to NumPy is refused ---------------------------------------------------
def test_numpy_conversion_raises_like_cupy():
    assert "__array__" in dir(cupy.ndarray)  # CuPy defines it only to refuse
    x = dev([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(x)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array(x)


@pytest.mark.parametrize("op", ["x + h", "h + x", "x * h", "xp.matmul(x, h)", "xp.concatenate([x, h])",
                                "xp.where(x > 0, x, h)"])
def test_a_numpy_array_in_a_device_operation_raises(op):
    x, h = dev(np.ones(3)), np.ones(3)  # noqa: F841 - read by eval(op)
    with pytest.raises(TypeError, match="Unsupported type"):
        eval(op)


def test_setitem_with_host_data_raises():
    x = dev(np.zeros(3))
    with pytest.raises(TypeError, match="Unsupported type"):
        x[:] = np.ones(3)
    x[:] = 2.0  # a Python scalar is fine, as on CuPy
    assert to_host(x).tolist() == [2.0, 2.0, 2.0]


def test_only_the_explicit_edges_move_data():
    x = dev(np.arange(4.0))
    assert isinstance(x, EmulatedArray) and is_device_array(x)
    h = x.get()
    assert type(h) is np.ndarray and h.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert type(to_host(x)) is np.ndarray and type(xp.asnumpy(x)) is np.ndarray


# --- 2. NumPy functions dispatch where CuPy implements them -------------------------------------
def test_numpy_functions_dispatch_to_the_device():
    x = dev(np.arange(6.0).reshape(2, 3))
    for result in (np.sum(x), np.einsum("ij->i", x), np.linalg.norm(x), np.exp(x), np.maximum(x, 1.0),
                   np.add.reduce(x, axis=0)):
        assert isinstance(result, EmulatedArray)
    assert to_host(np.einsum("ij->i", x)).tolist() == [3.0, 12.0]


def test_numpy_functions_cupy_lacks_raise():
    missing = [n for n in ("insert", "polyder", "nanquantile", "geomspace") if not hasattr(cupy, n)]
    assert missing, "pick NumPy functions the installed CuPy lacks"
    x = dev(np.arange(4.0))
    for name in missing:
        with pytest.raises(TypeError, match="no implementation found|not supported"):
            {"insert": lambda: np.insert(x, 0, 1.0), "polyder": lambda: np.polyder(x),
             "nanquantile": lambda: np.nanquantile(x, 0.5), "geomspace": lambda: np.geomspace(x, x + 1)}[name]()


# --- 3. only CuPy's names, ndarray attributes and keywords --------------------------------------
def test_every_emulated_name_exists_in_cupy():
    for name in dir(np):
        if name.startswith("_"):
            continue
        try:
            getattr(xp, name)
        except AttributeError:
            continue
        assert hasattr(cupy, name), f"cupy.{name} does not exist but the emulation offers it"


def test_names_cupy_lacks_do_not_exist():
    for name in ("busday_count", "datetime_as_string", "einsum_path"):
        assert not hasattr(cupy, name)
        with pytest.raises(AttributeError, match=name):
            getattr(xp, name)


def test_ndarray_attributes_are_cupys():
    x = dev(np.ones((2, 2)))
    numpy_only = sorted(n for n in set(dir(np.ndarray)) - set(dir(cupy.ndarray)) if not n.startswith("_"))
    assert numpy_only  # e.g. resize, setflags
    for name in numpy_only:
        with pytest.raises(AttributeError, match=name):
            getattr(x, name)
    assert not hasattr(x, "__index__") and "__index__" not in dir(cupy.ndarray)
    with pytest.raises(TypeError):
        range(dev(np.array(3)))  # no __index__ on CuPy either


def test_keywords_are_cupys():
    x = dev(np.ones(3))
    assert "initial" not in api.keywords("cupy.ndarray.sum") and "initial" in inspect.signature(np.sum).parameters
    with pytest.raises(TypeError, match="initial"):
        x.sum(initial=0.0)
    assert "where" not in api.keywords("cupy.add")
    with pytest.raises(TypeError, match="where"):
        xp.add(x, x, where=x > 0)
    assert "like" not in api.keywords("cupy.zeros")
    with pytest.raises(TypeError, match="like"):
        xp.zeros(3, like=x)
    assert to_host(x.sum(axis=0, keepdims=True)).tolist() == [3.0]  # CuPy's keywords work


def test_keyword_reading_falls_back_to_the_cython_signature_line():
    assert inspect.signature is not None
    with pytest.raises(ValueError):
        inspect.signature(cupy.add)  # a Cython ufunc: no signature object
    assert {"out", "casting", "dtype"} <= api.keywords("cupy.add")  # read from its docstring's first line
    assert api.keywords("cupy.einsum") is None and "cupy.einsum" in api.unchecked()  # **kwargs: not checked


def test_sparse_matrices_are_cupyx():
    vals, idx, ptr = dev(np.array([1.0, 2.0])), dev(np.array([0, 1], np.int32)), dev(np.array([0, 1, 2], np.int32))
    S = get_xpx(xp).scipy.sparse.csr_matrix((vals, idx, ptr), shape=(2, 2))
    y = S @ dev(np.ones((2, 1)))
    assert isinstance(y, EmulatedArray) and to_host(y).ravel().tolist() == [1.0, 2.0]
    assert isinstance(S.T @ dev(np.ones((2, 1))), EmulatedArray)
    scipy_only = sorted(n for n in set(dir(scipy.sparse.csr_matrix)) - set(dir(cupyx.scipy.sparse.csr_matrix))
                        if not n.startswith("_"))
    for name in scipy_only:
        with pytest.raises(AttributeError, match=name):
            getattr(S, name)
    with pytest.raises(TypeError):
        get_xpx(xp).scipy.sparse.csr_matrix((np.ones(2), idx, ptr), shape=(2, 2))


# --- 4. reductions and integer indexing stay on the device --------------------------------------
def test_reductions_and_integer_indexing_give_0d_device_arrays():
    x = dev(np.arange(6.0).reshape(2, 3))
    for r in (x.sum(), x.max(), xp.mean(x), x[1, 2], x[0][1], xp.linalg.norm(x), (x * x).sum(axis=None)):
        assert isinstance(r, EmulatedArray) and r.ndim == 0, type(r)
    before = LEDGER.snapshot()
    assert float(x[1, 2]) == 5.0 and int(x.sum()) == 15 and bool(x.any())
    assert LEDGER.snapshot()["d2h"] - before["d2h"] == 3  # each a device-to-host sync


# --- 5. the random generator offers only cupy.random.Generator's methods -------------------------
def test_random_generator_is_cupys():
    g = EMU.rng(0)
    cupy_methods = {n for n in dir(cupy.random.Generator) if not n.startswith("_")}
    for name in {n for n in dir(np.random.Generator) if not n.startswith("_")} - cupy_methods:
        with pytest.raises(AttributeError, match=name):
            getattr(g, name)
    draw = g.standard_normal((3,), dtype=np.float32)
    assert isinstance(draw, EmulatedArray) and draw.dtype == np.float32
    assert np.array_equal(to_host(draw), np.random.default_rng(0).standard_normal((3,), dtype=np.float32))


# --- 6. kernels run through their NumPy twins ------------------------------------------------------
def test_dequantisation_kernel_twin_equals_the_cpu_bit_for_bit():
    x = np.random.default_rng(0).standard_normal((257, 130)).astype(np.float32)
    for qt in ("nf4", "fp4"):
        p, s = quantize_4bit(x, 64, qt, compress_statistics=True)
        cpu = dequantize_4bit(p, s)
        s_dev = B.QuantState(absmax=dev(s.absmax), shape=s.shape, code=dev(s.code), blocksize=s.blocksize,
                             quant_type=qt, dtype=s.dtype, offset=s.offset,
                             state2=B.QuantState(absmax=dev(s.state2.absmax), shape=s.state2.shape,
                                                 code=dev(s.state2.code), blocksize=256, quant_type="dynamic"))
        out = dequantize_4bit(dev(p), s_dev)
        assert isinstance(out, EmulatedArray)
        assert np.array_equal(to_host(out).view(np.uint32), cpu.view(np.uint32)), qt
    assert DEQUANT_4BIT["name"] in emulated.replaced_kernels()


def test_kernel_without_a_twin_and_bad_kernel_arguments_raise():
    k = xp.ElementwiseKernel("float32 x", "float32 y", "y = x", "no_such_twin")
    with pytest.raises(NotImplementedError, match="no_such_twin"):
        k(dev(np.ones(2, np.float32)))
    assert "enable_cooperative_groups" in api.keywords("cupy.RawKernel")
    with pytest.raises(TypeError, match="not_a_cupy_option"):
        xp.RawKernel("extern \"C\" __global__ void k() {}", "k", not_a_cupy_option=1)


# --- 7. the seam: emulated arrays are recognised, the real cupy is untouched -------------------------
def test_the_seam_recognises_emulated_arrays_and_leaves_cupy_alone():
    x = dev(np.ones(2))
    assert get_xp(x) is xp and get_xp(np.ones(2)) is np and xp is not cupy
    assert sys.modules["cupy"] is cupy and not isinstance(x, cupy.ndarray)
    assert EMU.on_device and not get_backend("cpu").on_device


# --- 8. the ledger and the transfer guard -----------------------------------------------------------
def test_transfers_are_counted_at_the_edges():
    before = LEDGER.snapshot()
    x = dev(np.ones(3))
    to_host(x)
    assert host_scalar(x.sum(), "a named read") == 3.0
    now = LEDGER.snapshot()
    assert (now["h2d"] - before["h2d"], now["d2h"] - before["d2h"]) == (1, 2)
    assert now["by_name"]["a named read"] - before["by_name"].get("a named read", 0) == 1


def test_guard_refuses_implicit_transfers_naming_array_operation_and_line():
    x = dev(np.arange(3.0))
    with guard("error"):
        to_host(x)  # explicit edges pass
        host_scalar(x.sum(), "loss")
        line = sys._getframe().f_lineno + 2
        with pytest.raises(TransferError) as err:
            float(x.sum())
        msg = str(err.value)
        assert "float()" in msg and "float64 () array" in msg and f"test_emulated.py:{line}" in msg
        with pytest.raises(TransferError, match=r"cupy.asarray\(host data\).*test_emulated.py"):
            xp.asarray(np.ones(2))
        with pytest.raises(TransferError, match="bool()"):
            bool(x.any())


def test_env_guard_applies_in_steps_after_the_first(monkeypatch):
    monkeypatch.setenv(emulated.ENV_GUARD, "error")
    x = dev(np.arange(3.0))
    moved = end_step(begin_step(0))
    assert moved["d2h"] == 0
    s = begin_step(0)
    float(x.sum())  # the first step may sync freely
    assert end_step(s)["d2h"] == 1
    s = begin_step(1)
    try:
        with pytest.raises(TransferError, match="float()"):
            float(x.sum())
    finally:
        end_step(s)
    float(x.sum())  # outside a step: allowed again
