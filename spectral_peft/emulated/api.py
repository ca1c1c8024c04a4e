"""The installed CuPy's API, read from ``import cupy`` (which needs no GPU and no driver).

The emulated device offers exactly what this reads: a name exists on the emulated namespace only
when ``cupy`` has it, an ndarray method only when ``cupy.ndarray`` has it, a keyword argument
only when CuPy's function accepts it.

Keyword arguments are read by :func:`keywords`, in this order:
1. ``inspect.signature`` (CuPy's Python functions: ``cupy.zeros``, ``cupy.sum``, ...);
2. the signature line Cython embeds at the top of the docstring (CuPy's ufuncs, ndarray methods,
   ``cupy.random.Generator`` methods: ``add(x1, x2, /, out=None, *, casting='same_kind', ...)``);
3. neither readable, or the function takes ``**kwargs`` (``cupy.einsum``): None, "not checked".
   The names that fell back are listed by :func:`unchecked` so the emulation says what it could not
   pin.
"""
from __future__ import annotations

import ast
import functools
import inspect
import re
from types import ModuleType

_UNCHECKED: set[str] = set()


def cupy_module() -> ModuleType:
    """The real cupy module (ImportError with the install hint when it is missing)."""
    try:
        import cupy  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise ImportError("the gpu-emulated device reads the installed CuPy's API: install the 'gpu' "
                          f"extra (pip install cupy-cuda12x; no GPU or driver is needed) ({exc})") from exc
    return cupy


def resolve(path: str):
    """The CuPy object at a dotted path such as "cupy.linalg.norm" or "cupyx.scipy.sparse"."""
    cupy_module()
    import importlib  # noqa: PLC0415

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(path)


def _names_from_text_signature(line: str) -> tuple[frozenset, bool] | None:
    """Keyword-passable parameter names of a 'name(a, b=1, *, c=None)' line, and whether it has **kw."""
    line = re.sub(r"\b(?:str|bool|tuple|int|float|object|dict|list)\s+(?=\w)", "", line.replace("\\*", "*"))
    m = re.match(r"\s*[\w.]+\((.*)\)", line)
    if m is None:
        return None
    try:
        fn = ast.parse(f"def _f({m.group(1)}): pass").body[0]
    except SyntaxError:
        return None
    a = fn.args
    names = [x.arg for x in a.args + a.kwonlyargs]
    return frozenset(n for n in names if n != "self"), a.kwarg is not None


@functools.lru_cache(maxsize=None)
def keywords(path: str) -> frozenset | None:
    """The keyword names CuPy's callable at ``path`` accepts, or None where they cannot be read
    (or it takes **kwargs); see the module docstring."""
    obj = resolve(path)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        params = sig.parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            _UNCHECKED.add(path)
            return None
        return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    parsed = _names_from_text_signature(doc[0]) if doc else None
    if parsed is None or parsed[1]:
        _UNCHECKED.add(path)
        return None
    return parsed[0]


def check_keywords(path: str, kwargs: dict) -> None:
    """TypeError, as CuPy raises, for a keyword CuPy's ``path`` does not accept."""
    if not kwargs:
        return
    allowed = keywords(path)
    if allowed is None:
        return
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise TypeError(f"{path}() got an unexpected keyword argument {bad[0]!r} (gpu-emulated: the installed "
                        f"CuPy accepts {sorted(allowed)})")


@functools.lru_cache(maxsize=None)
def ndarray_attributes() -> frozenset:
    """Every attribute of ``cupy.ndarray``."""
    return frozenset(dir(cupy_module().ndarray))


@functools.lru_cache(maxsize=None)
def has(path: str) -> bool:
    """Whether CuPy has the object at ``path``."""
    try:
        resolve(path)
    except (ImportError, AttributeError):
        return False
    return True


def unchecked() -> list[str]:
    """The CuPy callables whose keyword arguments could not be read (so are not checked)."""
    return sorted(_UNCHECKED)
