"""Backend selection: names, dtypes, the environment variable, and edge transfers."""
import numpy as np
import pytest

from spectral_peft.backend import Backend, get_backend, get_xp, gpu_unavailable_reason, to_host


def test_cpu_backend_is_numpy_with_requested_dtype():
    b = get_backend("cpu", "float64")
    assert b.xp is np
    assert b.float == np.float64
    x = b.asarray([1, 2, 3])
    assert x.dtype == np.int64
    assert b.asarray([1.5]).dtype == np.float64
    assert get_xp(x) is np


def test_environment_variable_selects_device(monkeypatch):
    monkeypatch.setenv("SPECTRAL_PEFT_DEVICE", "cpu")
    assert get_backend().device == "cpu"


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="tpu"), "device must be one of"),
    (dict(dtype="float16"), "dtype must be one of"),
])
def test_bad_backend_names_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Backend(**kwargs)


@pytest.mark.skipif(gpu_unavailable_reason() is None, reason="a GPU is present")
def test_gpu_request_without_gpu_says_why():
    with pytest.raises(RuntimeError, match="device='gpu' was asked for but"):
        get_backend("gpu")


def test_round_trip_through_backend(device):
    b = get_backend(device, "float32")
    host = np.arange(6, dtype=np.float64).reshape(2, 3)
    dev = b.asarray(host)
    assert dev.dtype == np.float32
    np.testing.assert_array_equal(to_host(dev), host.astype(np.float32))


def test_rng_is_seeded(device):
    b = get_backend(device, "float64")
    a1 = to_host(b.rng(3).standard_normal(5))
    a2 = to_host(b.rng(3).standard_normal(5))
    np.testing.assert_array_equal(a1, a2)
