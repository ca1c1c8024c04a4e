"""The emulated ``cupy`` and ``cupyx`` namespaces: CuPy's names, NumPy's arithmetic.

``cupy_namespace()`` is what ``get_xp`` returns for emulated arrays. A name resolves only when the
installed CuPy has it (``AttributeError`` otherwise, as ``cupy.<name>`` would raise):
- a CuPy ufunc -> :class:`~spectral_peft.emulated.array.EmulatedUfunc` over NumPy's (SciPy's for
  ``cupyx.scipy.special``);
- a CuPy function -> NumPy's function of the same name behind CuPy's keywords and host/device rules;
- a dtype, constant or other object CuPy shares with NumPy -> that object;
- a submodule (``linalg``, ``random``, ``cupyx.scipy.sparse``, ...) -> its emulated namespace;
- the names with no NumPy counterpart that the engine needs are written out here: ``asarray`` and
  ``array`` (host data in is an implicit host-to-device copy), ``asnumpy``, ``get_array_module``,
  ``ndarray``, ``random.default_rng``/``Generator``, ``ElementwiseKernel``/``RawKernel`` (through
  NumPy twins, :mod:`~spectral_peft.emulated.kernels`), ``cupyx.scatter_add`` and the
  ``cupyx.scipy.sparse`` matrices (:mod:`~spectral_peft.emulated.sparse`).
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import numpy as np

from . import api
from .array import EmulatedArray, emulated_function, emulated_ufunc, unwrap, wrap
from .kernels import EmulatedElementwiseKernel, EmulatedRawKernel
from .ledger import LEDGER
from .sparse import SPARSE_OVERRIDES

# the NumPy/SciPy module that computes each emulated CuPy module
_TWIN_MODULES = {"cupy": "numpy", "cupy.linalg": "numpy.linalg", "cupy.random": "numpy.random",
                 "cupy.fft": "numpy.fft", "cupyx": None, "cupyx.scipy": "scipy",
                 "cupyx.scipy.special": "scipy.special", "cupyx.scipy.sparse": "scipy.sparse",
                 "cupyx.scipy.linalg": "scipy.linalg"}


def _is_host_data(obj) -> bool:
    if isinstance(obj, EmulatedArray):
        return False
    if isinstance(obj, (list, tuple)):
        return not any(isinstance(o, EmulatedArray) for o in obj)
    return True


def device_put(host, dtype=None, explicit: bool = True, op: str = "to_device"):
    """Host data -> a new emulated device array (a host-to-device copy, recorded)."""
    LEDGER.record("h2d", op, host, explicit=explicit)
    return EmulatedArray(np.array(host, dtype=dtype, copy=True))


def _asarray_like(name: str, np_func):
    """cupy.asarray/array/ascontiguousarray: device input stays on the device (np_func applied);
    host input is an implicit host-to-device copy."""
    path = f"cupy.{name}"

    def call(a, *args, **kwargs):
        api.check_keywords(path, kwargs)
        kwargs.pop("blocking", None)
        if _is_host_data(a):
            LEDGER.record("h2d", f"cupy.{name}(host data)", a, explicit=False)
            return EmulatedArray(np.array(np_func(a, *args, **kwargs), copy=True))
        return wrap(np_func(unwrap(a, path), *args, **kwargs))

    call.__name__ = name
    return call


def _asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, EmulatedArray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def _get_array_module(*args):
    return cupy_namespace() if any(isinstance(a, EmulatedArray) for a in args) else np


def _scatter_add(a, slices, value):
    if not isinstance(a, EmulatedArray):
        raise TypeError(f"cupyx.scatter_add: a must be a cupy.ndarray, got {type(a).__name__}")
    a.scatter_add(slices, value)


class EmulatedGenerator:
    """cupy.random.Generator on the emulated device: only its methods and keywords, drawing from
    NumPy's Generator over the same bit generator (so a seed gives the CPU's numbers)."""

    def __init__(self, np_generator: np.random.Generator):
        self._g = np_generator

    def __getattr__(self, name):
        path = f"cupy.random.Generator.{name}"
        if name.startswith("_") or not api.has(path):
            raise AttributeError(f"'cupy.random.Generator' object has no attribute {name!r} (gpu-emulated "
                                 "mirrors the installed CuPy)")
        target = getattr(self._g, name)

        def method(*args, **kwargs):
            api.check_keywords(path, kwargs)
            return wrap(target(*unwrap(args, path), **unwrap(kwargs, path)))

        return method


def _default_rng(seed=None):
    api.check_keywords("cupy.random.default_rng", {"seed": seed})
    return EmulatedGenerator(np.random.default_rng(seed))


_OVERRIDES = {
    "cupy.asarray": _asarray_like("asarray", np.asarray),
    "cupy.array": _asarray_like("array", np.array),
    "cupy.ascontiguousarray": _asarray_like("ascontiguousarray", np.ascontiguousarray),
    "cupy.asnumpy": _asnumpy,
    "cupy.get_array_module": _get_array_module,
    "cupy.ndarray": EmulatedArray,
    "cupy.ElementwiseKernel": EmulatedElementwiseKernel,
    "cupy.RawKernel": EmulatedRawKernel,
    "cupy.random.default_rng": _default_rng,
    "cupy.random.Generator": EmulatedGenerator,
    "cupyx.scatter_add": _scatter_add,
    **SPARSE_OVERRIDES,
}


class EmulatedNamespace(ModuleType):
    """One emulated module (``cupy``, ``cupy.linalg``, ``cupyx.scipy.sparse``, ...)."""

    def __init__(self, path: str):
        super().__init__(path, f"gpu-emulated {path}")
        self.__path = path

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = resolve_emulated(f"{self.__path}.{name}")
        setattr(self, name, value)
        return value

    def __repr__(self):
        return f"<gpu-emulated namespace {self.__path}>"


@functools.lru_cache(maxsize=None)
def _namespace(path: str) -> EmulatedNamespace:
    return EmulatedNamespace(path)


def cupy_namespace() -> EmulatedNamespace:
    """The emulated ``cupy`` (what ``get_xp`` returns for emulated arrays)."""
    return _namespace("cupy")


def cupyx_namespace() -> EmulatedNamespace:
    """The emulated ``cupyx``."""
    return _namespace("cupyx")


def resolve_emulated(path: str):
    """The emulated object for CuPy's dotted ``path`` (see the module docstring)."""
    if path in _OVERRIDES:
        return _OVERRIDES[path]
    mod_path, name = path.rsplit(".", 1)
    try:
        real = api.resolve(path)
    except (ImportError, AttributeError):
        raise AttributeError(f"module {mod_path!r} has no attribute {name!r} (gpu-emulated mirrors the "
                             f"installed CuPy {api.cupy_module().__version__})") from None
    if isinstance(real, ModuleType):
        if path not in _TWIN_MODULES:
            raise AttributeError(f"gpu-emulated has no emulation of the module {path!r}")
        return _namespace(path)
    twin_name = _TWIN_MODULES.get(mod_path)
    twin = None if twin_name is None else getattr(importlib.import_module(twin_name), name, None)
    if twin is not None and twin is real:  # a dtype, constant or helper CuPy takes from NumPy
        return real
    if type(real).__name__ in ("ufunc", "_GUFunc") and isinstance(twin, np.ufunc):
        return emulated_ufunc(path, twin)
    if not callable(real):
        return real if twin is None else twin
    if twin is None or isinstance(real, type):
        raise AttributeError(f"gpu-emulated has no NumPy twin for {path} (it needs a real GPU)")
    return emulated_function(path, twin)
