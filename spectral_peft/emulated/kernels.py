"""CuPy kernels on the emulated device: each runs through its registered NumPy twin.

A module that defines a CuPy kernel registers, beside it, a NumPy function computing the same
documented formula (:func:`register_twin`, keyed by the kernel's ``name``), and an ``example`` that
draws valid inputs. On the emulated device ``xp.ElementwiseKernel(...)``/``xp.RawKernel(...)``
accept exactly CuPy's constructor arguments and, when called, run the twin; the first call of each
says so on stderr and :func:`replaced_kernels` lists them. ``benchmarks/gpu_kernels.py`` checks on a
real GPU that each kernel equals its twin bit for bit on the examples.

Twin conventions:
- ElementwiseKernel: ``twin(*inputs, size) -> output`` (a tuple for several outputs), NumPy arrays
  and scalars in the order of ``in_params``, ``size`` the number of elements computed (the
  outputs' size, or the call's ``size=``); example(rng) -> (inputs, size);
- RawKernel: ``twin(grid, block, args)`` writing into the NumPy arrays of ``args`` in place.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import api
from .array import EmulatedArray, unwrap, wrap


@dataclass(frozen=True)
class Twin:
    """A kernel's NumPy twin: kind "ElementwiseKernel" or "RawKernel", the function, and
    example(rng) -> the kernel's call arguments as NumPy arrays/scalars."""

    kind: str
    fn: Callable
    example: Callable | None = None
    source: dict | None = None  # the CuPy constructor's keyword arguments (for the real-GPU check)


TWINS: dict[str, Twin] = {}
_REPLACED: list[str] = []


def register_twin(name: str, kind: str, fn: Callable, example: Callable | None = None,
                  source: dict | None = None) -> None:
    """Register ``fn`` as the NumPy twin of the CuPy kernel called ``name`` (``source``: the keyword
    arguments that build the kernel, so a real-GPU check can compile it)."""
    if kind not in ("ElementwiseKernel", "RawKernel"):
        raise ValueError(f"kind must be 'ElementwiseKernel' or 'RawKernel', got {kind!r}")
    TWINS[name] = Twin(kind, fn, example, source)


def replaced_kernels() -> list[str]:
    """The kernels this process ran through their NumPy twins, in first-use order."""
    return list(_REPLACED)


def _twin(name: str, kind: str) -> Twin:
    twin = TWINS.get(name)
    if twin is None or twin.kind != kind:
        raise NotImplementedError(f"gpu-emulated: the {kind} {name!r} has no registered NumPy twin; register "
                                  "one with spectral_peft.emulated.register_twin beside the kernel")
    if name not in _REPLACED:
        _REPLACED.append(name)
        print(f"gpu-emulated: {kind} {name!r} runs through its NumPy twin", file=sys.stderr)
    return twin


def _n_params(params: str) -> int:
    return len([p for p in params.split(",") if p.strip()])


class EmulatedElementwiseKernel:
    """cupy.ElementwiseKernel on the emulated device (see the module docstring)."""

    def __init__(self, in_params, out_params, operation, name="kernel", *args, **kwargs):
        api.check_keywords("cupy.ElementwiseKernel", kwargs)
        self.in_params, self.out_params, self.operation, self.name = in_params, out_params, operation, name
        self.nin, self.nout = _n_params(in_params), _n_params(out_params)

    def __call__(self, *args, size=None, block_size=None, stream=None):
        if len(args) not in (self.nin, self.nin + self.nout):
            raise TypeError(f"Wrong number of arguments for {self.name!r}: expected {self.nin} or "
                            f"{self.nin + self.nout}, got {len(args)}")
        where = f"ElementwiseKernel {self.name!r}"
        twin = _twin(self.name, "ElementwiseKernel")
        inputs = unwrap(args[:self.nin], where)
        outs = args[self.nin:]
        if size is None and outs:
            size = outs[0].size
        elif size is None:  # the inputs' broadcast size (a raw input needs outputs or size=)
            shapes = [a.shape for a in inputs if hasattr(a, "shape")]
            if not shapes:
                raise ValueError(f"{where}: give the output arrays or size=")
            size = int(np.prod(np.broadcast_shapes(*shapes)))
        result = twin.fn(*inputs, size=size)
        if not outs:
            return wrap(result)
        results = result if self.nout > 1 else (result,)
        for out, r in zip(outs, results):
            if not isinstance(out, EmulatedArray):
                raise TypeError(f"{where}: output arguments must be cupy.ndarray, got {type(out).__name__}")
            out._a[...] = np.asarray(r, dtype=out.dtype)
        return outs if self.nout > 1 else outs[0]


class EmulatedRawKernel:
    """cupy.RawKernel on the emulated device (see the module docstring)."""

    def __init__(self, code, name, *args, **kwargs):
        api.check_keywords("cupy.RawKernel", kwargs)
        self.code, self.name = code, name

    def __call__(self, grid, block, args, shared_mem=0):
        _twin(self.name, "RawKernel").fn(grid, block, unwrap(tuple(args), f"RawKernel {self.name!r}"))
