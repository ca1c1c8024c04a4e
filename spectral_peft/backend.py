"""Backend selection: NumPy (CPU) or CuPy (GPU), the dtype policy and seeded RNGs.

The backend is chosen once, at the edge (a CLI flag, a function argument, or the environment
variable ``SPECTRAL_PEFT_DEVICE=cpu|gpu|gpu-emulated``; "gpu-emulated" is CuPy's API and host/device
rules computed by NumPy on the CPU, :mod:`spectral_peft.emulated`). Inside the engine every function takes its array
namespace from its arrays with :func:`get_xp`, never from a global: NumPy code is never written
as ``import cupy as np``. Data moves between host and device only through :func:`to_device` and
:func:`to_host`, which callers use at the API edge (loading weights, writing results), never
silently in the middle of a computation. Both count every transfer (device-to-host "d2h",
host-to-device "h2d") in :data:`spectral_peft.emulated.LEDGER`, on a real GPU and on the emulated
one; :func:`host_scalar` is the named read of a device scalar a training step needs (its loss,
the NaN guard, clipping, input checks). The transfer guard (``SPECTRAL_PEFT_TRANSFER_GUARD=error``)
turns every other transfer the emulated device sees in a training step after the first
(:func:`begin_step`/:func:`end_step`) into an error naming the array, the operation and the call
site.

Dtype policy: parameters and activations share one floating dtype, float32 (speed) or float64
(the oracle). Token ids and labels are int64. Quantised weights are uint8 codes with float32
statistics whatever the compute dtype, as in bitsandbytes.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from threadpoolctl import threadpool_limits

from .emulated import LEDGER, EmulatedArray, cupy_namespace, cupyx_namespace, device_put
from .emulated.api import cupy_module
from .emulated.array import private_host_array
from .emulated.ledger import since

DEVICES = ("cpu", "gpu", "gpu-emulated")
DTYPES = ("float32", "float64")
ENV_DEVICE = "SPECTRAL_PEFT_DEVICE"


def cupy_or_none() -> ModuleType | None:
    """The cupy module when it imports and sees a GPU, else None."""
    try:
        import cupy  # noqa: PLC0415 - optional dependency, imported only on demand
    except Exception:  # ImportError, or a CUDA library failing to load
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def gpu_unavailable_reason() -> str | None:
    """None when a CuPy GPU backend can be used, else a sentence saying why not."""
    try:
        import cupy  # noqa: F401, PLC0415
    except Exception as exc:
        return f"CuPy is not importable ({type(exc).__name__}: {exc}); install the 'gpu' extra"
    if cupy_or_none() is None:
        return "CuPy is installed but sees no CUDA device"
    return None


def emulation_unavailable_reason() -> str | None:
    """None when the gpu-emulated device can be used (the cupy package imports), else why not."""
    try:
        cupy_module()
    except ImportError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class Backend:
    """Where arrays live and which float dtype they use.

    Attributes:
        device: "cpu" (NumPy), "gpu" (CuPy) or "gpu-emulated" (CuPy's rules on NumPy).
        dtype:  "float32" or "float64", the dtype of parameters and activations.
    """

    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device == "gpu":
            reason = gpu_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"device='gpu' was asked for but {reason}; device='gpu-emulated' runs "
                                   "CuPy's rules on the CPU")
        if self.device == "gpu-emulated":
            reason = emulation_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"device='gpu-emulated' was asked for but {reason}")

    @property
    def on_device(self) -> bool:
        """True for "gpu" and "gpu-emulated": arrays live apart from the host."""
        return self.device != "cpu"

    @property
    def xp(self) -> ModuleType:
        """The array namespace: numpy, cupy, or the emulated cupy namespace."""
        if self.device == "gpu":
            import cupy  # noqa: PLC0415

            return cupy
        if self.device == "gpu-emulated":
            return cupy_namespace()
        return np

    @property
    def float(self) -> np.dtype:
        return np.dtype(self.dtype)

    def asarray(self, host_array, dtype=None):
        """Host data -> an array of this backend (a copy on GPU; float data cast to self.dtype)."""
        host_array = np.asarray(host_array)
        if dtype is None:
            dtype = self.float if host_array.dtype.kind == "f" else host_array.dtype
        return to_device(host_array.astype(dtype, copy=False), self)

    def zeros(self, shape, dtype=None):
        return self.xp.zeros(shape, dtype=self.float if dtype is None else dtype)

    def rng(self, seed: int):
        """A seeded generator of this backend's namespace (numpy.random.Generator or cupy's)."""
        return self.xp.random.default_rng(seed)


@dataclass(frozen=True)
class ShapeBackend(Backend):
    """A CPU backend whose parameters hold no memory: every array :meth:`zeros` (and the models'
    Init) makes is a zero-stride view of one element, of the right shape and dtype. A model built
    on it is a skeleton: its parameters' shapes are the ones its config implies, at no allocation
    (a config asking for a 10^7-wide model costs nothing). Never run a forward on it; the loader
    (spectral_peft.model.hf) compares a checkpoint's tensors with a skeleton before building the
    real model. Small host buffers (asarray: RoPE's inverse frequencies) are ordinary arrays."""

    def zeros(self, shape, dtype=None):
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
        one = np.zeros(1, dtype=self.float if dtype is None else dtype)
        # writeable, as the model constructors set rows (a padding embedding row) in place
        return np.lib.stride_tricks.as_strided(one, shape=shape, strides=(0,) * len(shape), writeable=True)


def get_backend(device: str | None = None, dtype: str = "float32") -> Backend:
    """The backend for ``device`` (default: $SPECTRAL_PEFT_DEVICE, else "cpu") and ``dtype``."""
    if device is None:
        device = os.environ.get(ENV_DEVICE, "cpu").strip().lower() or "cpu"
    return Backend(device=device, dtype=str(np.dtype(dtype)))


def get_xp(*arrays) -> ModuleType:
    """The namespace that owns ``arrays``: cupy, the emulated cupy namespace, or numpy (host data
    or no arrays)."""
    for a in arrays:
        if isinstance(a, EmulatedArray):
            return cupy_namespace()
        if type(a).__module__.startswith("cupy"):
            import cupy  # noqa: PLC0415

            return cupy
    return np


def get_xpx(xp: ModuleType) -> ModuleType | None:
    """The ``cupyx`` that goes with the namespace ``xp`` (cupyx.scatter_add, cupyx.scipy.special,
    cupyx.scipy.sparse): the real one for cupy, the emulated one for the emulated namespace, None
    for numpy (whose counterparts are SciPy's)."""
    if xp is np:
        return None
    if xp is cupy_namespace():
        return cupyx_namespace()
    import cupyx  # noqa: PLC0415
    import cupyx.scipy.sparse  # noqa: F401, PLC0415
    import cupyx.scipy.special  # noqa: F401, PLC0415

    return cupyx


def is_device_array(a) -> bool:
    """A CuPy or an emulated device array."""
    return isinstance(a, EmulatedArray) or type(a).__module__.startswith("cupy")


def device_of(a) -> str:
    """The device name ("cpu", "gpu", "gpu-emulated") an array lives on."""
    if isinstance(a, EmulatedArray):
        return "gpu-emulated"
    return "gpu" if is_device_array(a) else "cpu"


def to_device(host_array: np.ndarray, backend: Backend):
    """Host -> the backend's device (an explicit, counted copy). A no-op (no copy) on CPU."""
    if backend.device == "gpu":
        import cupy  # noqa: PLC0415

        LEDGER.record("h2d", "to_device", host_array, explicit=True)
        return cupy.asarray(host_array)
    if backend.device == "gpu-emulated":
        return device_put(host_array)
    return host_array


def to_xp(host_array, xp: ModuleType):
    """Host data -> an array of the namespace ``xp`` (numpy: as is; a device: an explicit, counted
    copy). For engine code that holds a namespace rather than a Backend (index arrays of a sparse
    support, a kernel's code book)."""
    if xp is np:
        return np.asarray(host_array)
    if xp is cupy_namespace():
        return device_put(host_array)
    LEDGER.record("h2d", "to_device", host_array, explicit=True)
    return xp.asarray(host_array)


def to_host(a) -> np.ndarray:
    """Any backend's array -> a NumPy array (an explicit, counted device->host copy on a device)."""
    if isinstance(a, EmulatedArray):
        return a.get()
    if is_device_array(a):
        LEDGER.record("d2h", "to_host", a, explicit=True)
        return a.get()
    return np.asarray(a)


def host_scalar(a, name: str):
    """The Python value of a 0-d (or one-element) array, as a named, explicit device-to-host read:
    the few reads a training step needs (its loss, the NaN guard, the clipping norm) are counted
    under ``name`` and allowed by the transfer guard. On the CPU it is ``a.item()``."""
    if not is_device_array(a):
        return np.asarray(a).item()
    LEDGER.record("d2h", "host_scalar", a, explicit=True, name=name)
    if isinstance(a, EmulatedArray):
        return private_host_array(a).item()
    return a.item()


def begin_step(step: int) -> dict:
    """Start accounting training step ``step`` (0-based): returns the counts so far, for
    :func:`end_step`. From the second step on, ``SPECTRAL_PEFT_TRANSFER_GUARD`` applies until
    end_step (the first step may set up device state: code books, caches)."""
    LEDGER.armed = step >= 1
    return LEDGER.snapshot()


def end_step(before: dict) -> dict:
    """The step's transfers since :func:`begin_step`: {"d2h": n, "h2d": n, "by_name": {name: n}}."""
    LEDGER.armed = False
    return since(before)


def host_rng(seed: int) -> np.random.Generator:
    """The host generator used for parameter initialisation, so that CPU and GPU runs with the
    same seed start from identical weights (drawn on the host, moved once at the edge)."""
    return np.random.default_rng(seed)


_ALLOCATOR_TUNED = False


def tune_host_allocator() -> bool:
    """Keep freed large host buffers in the process instead of returning them to the system.

    A training step allocates and frees the same large activation arrays every step. By default
    glibc serves arrays above 128 KiB with fresh mmap()s and unmaps them on free, so every step
    pays page faults to zero-fill memory it just gave back (measured here: they cost more than
    any single op). Raising the mmap threshold and disabling trimming makes freed blocks reusable,
    as llm.c gets by preallocating. Process-wide, idempotent; a no-op (returning False) off glibc.
    Called by the CLI and the benchmarks (both sides of a benchmark share the process).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h parameter numbers
    ok = (mallopt(m_mmap_threshold, 1 << 30) == 1          # serve up to 1 GiB from the heap
          and mallopt(m_trim_threshold, 2**31 - 1) == 1     # never give the heap top back
          and mallopt(m_top_pad, 0) == 1)
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


def blas_threads(n: int):
    """A context limiting the host BLAS to ``n`` threads (threadpoolctl); n = 0: as configured."""
    if n <= 0:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")
