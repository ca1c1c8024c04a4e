"""The gpu-emulated device: CuPy's rules on the CPU, for CI and for checking one's own code.

``Backend("gpu-emulated")`` (``--device gpu-emulated``, ``SPECTRAL_PEFT_DEVICE=gpu-emulated``)
computes with NumPy behind the installed CuPy's API and host/device discipline, so that code
which would break on a GPU breaks here: implicit host conversions raise TypeError, names and
keyword arguments CuPy lacks do not exist, reductions stay on the device, kernels run through
NumPy twins, and every transfer is counted (see docs/gpu.md). It never shadows or replaces the
real ``cupy`` module: its arrays are :class:`EmulatedArray` and its namespace is a separate object
reached through :func:`spectral_peft.backend.get_xp`.

Modules: ``api`` (reading the installed CuPy), ``array`` (the device array, ufuncs, functions),
``namespace`` (the emulated ``cupy``/``cupyx``), ``kernels`` (NumPy twins of CuPy kernels),
``sparse`` (``cupyx.scipy.sparse``), ``ledger`` (transfer accounting and the guard).
"""
from .api import unchecked
from .array import EmulatedArray
from .kernels import TWINS, register_twin, replaced_kernels
from .ledger import ENV_GUARD, LEDGER, TransferError, guard, since
from .namespace import EmulatedGenerator, cupy_namespace, cupyx_namespace, device_put

__all__ = ["EmulatedArray", "EmulatedGenerator", "TWINS", "register_twin", "replaced_kernels", "ENV_GUARD",
           "LEDGER", "TransferError", "guard", "since", "cupy_namespace", "cupyx_namespace", "device_put",
           "unchecked"]
