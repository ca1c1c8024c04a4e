"""The emulated device array: a NumPy array behind CuPy's rules.

What it enforces, as ``cupy.ndarray`` does on a real GPU:
- no implicit conversion to NumPy: ``np.asarray(x)`` raises TypeError (``__array__``), and so does a
  NumPy array mixed into an operation on device arrays; ``.get()`` (and the backend's ``to_host``)
  is the way back to the host;
- NumPy functions called on it dispatch through ``__array_function__``/``__array_ufunc__`` only
  where CuPy implements the same name, else NumPy raises TypeError ("no implementation found");
- only the attributes ``cupy.ndarray`` has exist, and their keyword arguments are CuPy's;
- reductions and integer indexing give 0-d device arrays, never host scalars; ``float()``,
  ``int()``, ``bool()``, ``.item()``, ``.tolist()`` on it are device-to-host syncs, recorded in
  :mod:`~spectral_peft.emulated.ledger` (and refused under the transfer guard); CuPy has no
  ``__index__``, so neither has this (``range(x)`` raises TypeError as on a GPU).
"""
from __future__ import annotations

import numpy as np

from . import api
from .ledger import LEDGER

_IMPLICIT_MSG = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
                 "NumPy array explicitly. (gpu-emulated: as cupy.ndarray; use spectral_peft.backend.to_host)")
# attributes of cupy.ndarray that need a real GPU (device memory, DLPack, CUDA structs)
_NOT_EMULATED = frozenset({"data", "device", "cstruct", "mdspan", "toDlpack", "reduced_view", "__dlpack__",
                           "__dlpack_device__", "__cuda_array_interface__"})


class EmulatedArray:
    """A device array of the gpu-emulated backend (the data lives in a private NumPy array)."""

    __slots__ = ("_a",)
    __array_priority__ = 100.0
    __hash__ = None

    def __init__(self, host: np.ndarray):
        self._a = host

    # --- the explicit edge -------------------------------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
        """Device -> host copy (explicit: recorded, never refused)."""
        LEDGER.record("d2h", ".get()", self, explicit=True)
        host = np.array(self._a, order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def set(self, arr, stream=None) -> None:
        """Host -> device copy into this array (explicit, as cupy.ndarray.set)."""
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr).__name__}")
        LEDGER.record("h2d", ".set()", arr, explicit=True)
        self._a[...] = arr

    # --- refused implicit conversions ----------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT_MSG)

    def _sync(self, op: str):
        LEDGER.record("d2h", op, self, explicit=False)
        return self._a

    def __float__(self):
        return float(self._sync("float()"))

    def __int__(self):
        return int(self._sync("int()"))

    def __complex__(self):
        return complex(self._sync("complex()"))

    def __bool__(self):
        return bool(self._sync("bool()"))

    def __format__(self, spec):
        return format(self._sync("format()")[()] if self._a.ndim == 0 else self._a, spec)

    def item(self, *args):
        return self._sync(".item()").item(*args)

    def tolist(self):
        return self._sync(".tolist()").tolist()

    def __repr__(self):
        return repr(self._a).replace("array(", "array(", 1) + "  # gpu-emulated"

    def __str__(self):
        return str(self._a)

    # --- metadata (no sync) -------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: EmulatedArray(self._a.T))
    mT = property(lambda self: EmulatedArray(self._a.mT))
    real = property(lambda self: EmulatedArray(self._a.real))
    imag = property(lambda self: EmulatedArray(self._a.imag))
    base = property(lambda self: None if self._a.base is None else EmulatedArray(self._a.base))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for i in range(len(self._a)):
            yield self[i]

    def __copy__(self):
        return EmulatedArray(self._a.copy())

    def __deepcopy__(self, memo):
        return EmulatedArray(self._a.copy())

    # --- ndarray methods: only CuPy's, with CuPy's keywords --------------------------------------
    def __getattr__(self, name):
        if name.startswith("_") or name in _NOT_EMULATED or name not in api.ndarray_attributes() \
                or not hasattr(np.ndarray, name):
            why = " (needs a real GPU)" if name in _NOT_EMULATED else ""
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}{why} (gpu-emulated mirrors "
                                 f"cupy.ndarray of the installed CuPy)")
        target = getattr(self._a, name)
        path = f"cupy.ndarray.{name}"

        def method(*args, **kwargs):
            api.check_keywords(path, kwargs)
            return wrap_out(target(*unwrap(args, path), **unwrap(kwargs, path)), kwargs)

        method.__name__ = name
        return method

    def scatter_add(self, slices, value):
        np.add.at(self._a, unwrap(slices, "cupy.ndarray.scatter_add"), unwrap(value, "cupy.ndarray.scatter_add"))

    # --- indexing ------------------------------------------------------------------------------
    def __getitem__(self, key):
        return wrap(self._a[index_key(key)])

    def __setitem__(self, key, value):
        self._a[index_key(key)] = unwrap(value, "cupy.ndarray.__setitem__")

    # --- NumPy protocols: dispatch where CuPy implements the name ---------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        path = f"cupy.{ufunc.__name__}"
        if not api.has(path) or (method != "__call__" and not api.has(f"{path}.{method}")):
            return NotImplemented
        uf = emulated_ufunc(path, ufunc)
        return uf(*inputs, **kwargs) if method == "__call__" else getattr(uf, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        module = func.__module__ or "numpy"
        path = module.replace("numpy", "cupy", 1) + "." + func.__name__
        if not module.startswith("numpy") or "._" in path or not api.has(path):
            return NotImplemented
        return emulated_function(path, func)(*args, **kwargs)


def private_host_array(a: EmulatedArray) -> np.ndarray:
    """The NumPy array behind ``a``, without recording a transfer: for callers that have just
    recorded one themselves (spectral_peft.backend.host_scalar)."""
    return a._a


def unwrap(obj, where: str):
    """Device arrays -> their private NumPy arrays, recursively through lists, tuples and dicts; a
    NumPy array raises TypeError as CuPy's does for host data in a device operation."""
    if isinstance(obj, EmulatedArray):
        return obj._a
    if isinstance(obj, np.ndarray):
        raise TypeError(f"Unsupported type {type(obj)} (gpu-emulated: a NumPy {describe_host(obj)} was passed "
                        f"to {where}; move it with spectral_peft.backend.to_device first)")
    if isinstance(obj, (list, tuple)):
        return type(obj)(unwrap(o, where) for o in obj)
    if isinstance(obj, dict):
        return {k: unwrap(v, where) for k, v in obj.items()}
    return obj


def describe_host(a: np.ndarray) -> str:
    return f"{a.dtype} {a.shape} array"


def index_key(key):
    """An index for the private array. Host index arrays (NumPy arrays, lists) are host-to-device
    copies on CuPy: recorded as implicit transfers."""
    parts = key if isinstance(key, tuple) else (key,)
    out = []
    for k in parts:
        if isinstance(k, EmulatedArray):
            out.append(k._a)
        elif isinstance(k, (np.ndarray, list)):
            LEDGER.record("h2d", "indexing with a host array", np.asarray(k), explicit=False)
            out.append(np.asarray(k))
        else:
            out.append(k)
    return tuple(out) if isinstance(key, tuple) else out[0]


def wrap(r):
    """NumPy results -> device arrays (a NumPy scalar becomes a 0-d device array)."""
    if isinstance(r, np.ndarray):
        return EmulatedArray(r)
    if isinstance(r, np.generic):
        return EmulatedArray(np.asarray(r))
    if isinstance(r, (list, tuple)) and any(isinstance(x, (np.ndarray, np.generic)) for x in r):
        return type(r)(wrap(x) for x in r)
    return r


def wrap_out(r, kwargs):
    """wrap(r), returning the caller's own ``out=`` device array when NumPy wrote into it."""
    out = kwargs.get("out")
    if isinstance(out, EmulatedArray) and r is out._a:
        return out
    return wrap(r)


class EmulatedUfunc:
    """A CuPy ufunc on the emulated device: NumPy's ufunc of the same name, CuPy's keywords, and
    only the methods (reduce, accumulate, outer, at, reduceat) CuPy's ufunc has."""

    def __init__(self, path: str, np_ufunc):
        self.path, self._uf = path, np_ufunc
        self.__name__ = np_ufunc.__name__
        self.nin, self.nout = np_ufunc.nin, np_ufunc.nout

    def __call__(self, *args, **kwargs):
        api.check_keywords(self.path, kwargs)
        return wrap_out(self._uf(*unwrap(args, self.path), **unwrap(kwargs, self.path)), kwargs)

    def __getattr__(self, method):
        path = f"{self.path}.{method}"
        if method.startswith("_") or not api.has(path):
            raise AttributeError(f"{self.path} has no attribute {method!r} in the installed CuPy")
        target = getattr(self._uf, method)

        def call(*args, **kwargs):
            api.check_keywords(path, kwargs)
            return wrap_out(target(*unwrap(args, path), **unwrap(kwargs, path)), kwargs)

        return call

    def __repr__(self):
        return f"<gpu-emulated ufunc {self.path}>"


_UFUNCS: dict[str, EmulatedUfunc] = {}
_FUNCTIONS: dict[str, object] = {}


def emulated_ufunc(path: str, np_ufunc) -> EmulatedUfunc:
    """The (cached) emulated ufunc for CuPy's ``path`` over NumPy's ``np_ufunc``."""
    if path not in _UFUNCS:
        _UFUNCS[path] = EmulatedUfunc(path, np_ufunc)
    return _UFUNCS[path]


def emulated_function(path: str, np_func):
    """CuPy's function ``path`` on the emulated device: ``np_func`` on the private arrays, CuPy's
    keywords only, NumPy arrays refused, results as device arrays. Cached per path."""
    if path in _FUNCTIONS:
        return _FUNCTIONS[path]

    def call(*args, **kwargs):
        api.check_keywords(path, kwargs)
        return wrap_out(np_func(*unwrap(args, path), **unwrap(kwargs, path)), kwargs)

    call.__name__ = call.__qualname__ = path.rsplit(".", 1)[-1]
    call.__doc__ = f"gpu-emulated {path} (NumPy's {getattr(np_func, '__name__', path)} behind CuPy's rules)"
    _FUNCTIONS[path] = call
    return call


def _binary(ufunc_name: str, reflected: bool = False, inplace: bool = False):
    uf = emulated_ufunc(f"cupy.{ufunc_name}", getattr(np, ufunc_name))

    def op(self, other):
        if inplace:
            return uf(self, other, out=self)
        return uf(other, self) if reflected else uf(self, other)

    return op


def _unary(ufunc_name: str):
    uf = emulated_ufunc(f"cupy.{ufunc_name}", getattr(np, ufunc_name))

    def op(self):
        return uf(self)

    return op
_BINARY = {"add": "add", "sub": "subtract", "mul": "multiply", "truediv": "true_divide",
           "floordiv": "floor_divide", "mod": "remainder", "pow": "power", "matmul": "matmul",
           "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor", "lshift": "left_shift",
           "rshift": "right_shift"}
for _op, _uf in _BINARY.items():
    setattr(EmulatedArray, f"__{_op}__", _binary(_uf))
    setattr(EmulatedArray, f"__r{_op}__", _binary(_uf, reflected=True))
    if _op != "matmul":
        setattr(EmulatedArray, f"__i{_op}__", _binary(_uf, inplace=True))
for _op, _uf in {"eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal", "gt": "greater",
                 "ge": "greater_equal"}.items():
    setattr(EmulatedArray, f"__{_op}__", _binary(_uf))
for _op, _uf in {"neg": "negative", "pos": "positive", "abs": "absolute", "invert": "invert"}.items():
    setattr(EmulatedArray, f"__{_op}__", _unary(_uf))
