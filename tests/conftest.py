"""Shared fixtures: Hypothesis profiles and the backend parametrisation.

Hypothesis profiles: "ci" (bounded, the default when $CI is set), "dev" (the default locally) and
"thorough" (select with HYPOTHESIS_PROFILE=thorough). Deadlines are off: float64 gradient checks
are slow by nature and their timing is not what is being tested.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

from spectral_peft.backend import Backend, emulation_unavailable_reason, get_backend, gpu_unavailable_reason

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("dev", max_examples=50, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

_GPU_REASON = gpu_unavailable_reason()
_EMULATION_REASON = emulation_unavailable_reason()


def pytest_report_header(config):
    emulated = "gpu-emulated" if _EMULATION_REASON is None else f"no gpu-emulated ({_EMULATION_REASON})"
    gpu = "gpu" if _GPU_REASON is None else f"gpu cases skipped: {_GPU_REASON}"
    return f"spectral_peft backends: cpu, {emulated}, {gpu}"


def _device_params():
    """cpu; gpu-emulated (CuPy's rules on NumPy, wherever the cupy package imports); gpu where CuPy
    sees a device. SPECTRAL_PEFT_DEVICE=gpu (or gpu-emulated) runs only that device's cases."""
    want = os.environ.get("SPECTRAL_PEFT_DEVICE", "").strip().lower()
    gpu = pytest.param("gpu", marks=pytest.mark.skipif(_GPU_REASON is not None, reason=f"gpu backend: {_GPU_REASON}"))
    emulated = pytest.param("gpu-emulated", marks=pytest.mark.skipif(
        _EMULATION_REASON is not None, reason=f"gpu-emulated backend: {_EMULATION_REASON}"))
    if want == "gpu":
        return [gpu]
    if want == "gpu-emulated":
        return [emulated]
    return ["cpu", emulated, gpu]


@pytest.fixture(params=_device_params())
def device(request) -> str:
    """The device name of each backend present ("cpu", "gpu-emulated", and "gpu" where a GPU is)."""
    return request.param


@pytest.fixture
def backend64(device) -> Backend:
    return get_backend(device, "float64")


@pytest.fixture
def backend32(device) -> Backend:
    return get_backend(device, "float32")


@pytest.fixture(params=["float64", "float32"])
def backend(device, request) -> Backend:
    return get_backend(device, request.param)
