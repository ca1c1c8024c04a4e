"""Validated reading and atomic writing of safetensors and JSON files.

Every reader here either returns fully checked data or raises :class:`FileFormatError`, a
``ValueError`` whose message names the file, the key (when one is at fault), what was found and
what was expected. A corrupted, truncated or mismatched file never surfaces as a traceback from
inside NumPy or a JSON parser, and nothing is returned half-read.

The safetensors reader is a small parser of the format itself (so that every defect gets its own
message), following the format's specification (huggingface/safetensors, README "Format"):

    8 bytes  N, unsigned little-endian 64-bit: the header's length
    N bytes  a UTF-8 JSON object {key: {"dtype": str, "shape": [int...], "data_offsets": [begin, end]},
             optional "__metadata__": {str: str}}
    rest     the byte buffer; offsets are relative to its start, the tensors tile it with no gaps
             and no overlaps, and each tensor is row-major little-endian.

Writers are atomic: the bytes go to a temporary file in the same directory, which is flushed and
fsync'ed, then renamed over the target (``os.replace``, atomic on POSIX), and the directory is
fsync'ed so the rename itself is durable. A crash at any point leaves either the old file or the
new one, never a mixture.

Shape legend: arrays of any shape; ``expected`` maps key -> (shape or None, dtype or None).
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping

import numpy as np

from ..backend import to_host

# safetensors dtype names -> NumPy dtypes (little-endian). BF16 has no NumPy dtype: it is read
# as float32 by shifting its 16 bits into the high half of a float32, which is exact.
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_BF16 = "BF16"
_NAMES = {v.newbyteorder("=") if v.itemsize > 1 else v: k for k, v in _DTYPES.items()}
# A header larger than this is refused before it is read (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


class FileFormatError(ValueError):
    """A file that cannot be used as it is: corrupted, truncated, or not what was expected.

    Attributes: ``path`` (the file), ``key`` (the tensor / JSON key at fault, or None), ``problem``.
    """

    def __init__(self, path, problem: str, key: str | None = None):
        self.path = str(path)
        self.key = key
        self.problem = problem
        where = f"{self.path}: key {key!r}: " if key is not None else f"{self.path}: "
        super().__init__(where + problem)


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------
def fsync_dir(path) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:  # a platform that cannot open directories (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, directory fsync)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


# ------------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------------
def safetensors_bytes(arrays: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors encoding of ``arrays`` (name -> array of any backend; copied to the host).

    Tensors are laid out in sorted key order, as the reference implementation does.
    """
    header: dict = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must map str -> str, got {k!r}: {type(v).__name__}")
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for key in sorted(arrays):
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise ValueError(f"safetensors key must be a non-empty str other than '__metadata__', got {key!r}")
        a = np.asarray(to_host(arrays[key]), order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        dt = a.dtype.newbyteorder("=") if a.dtype.itemsize > 1 else a.dtype
        if dt not in _NAMES:
            raise ValueError(f"safetensors key {key!r}: dtype {a.dtype} cannot be stored; "
                             f"storable dtypes: {sorted(str(d) for d in _NAMES)}")
        raw = a.astype(_DTYPES[_NAMES[dt]], copy=False).tobytes()
        header[key] = {"dtype": _NAMES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned, as the reference does
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def save_safetensors(arrays: Mapping[str, object], path, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``arrays`` to ``path`` as safetensors, atomically."""
    atomic_write_bytes(path, safetensors_bytes(arrays, metadata))


def _read_file(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileFormatError(path, "file not found") from None
    except IsADirectoryError:
        raise FileFormatError(path, "is a directory, expected a file") from None
    except OSError as exc:
        raise FileFormatError(path, f"cannot be read ({exc.strerror})") from None


def parse_safetensors(raw: bytes, path="<bytes>") -> tuple[dict, dict]:
    """Parse safetensors bytes into (name -> NumPy array, metadata), validating everything.

    Arrays are fresh, writable, native-endian copies. Raises FileFormatError on any defect.
    """
    if len(raw) < 8:
        raise FileFormatError(path, f"truncated: {len(raw)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise FileFormatError(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
                                    "(not a safetensors file, or corrupted)")
    if 8 + n > len(raw):
        raise FileFormatError(path, f"truncated: header length says {n} bytes but only {len(raw) - 8} follow")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FileFormatError(path, f"header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FileFormatError(path, f"header must be a JSON object, got {type(header).__name__}")
    data = memoryview(raw)[8 + n:]
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise FileFormatError(path, "__metadata__ must map str -> str", key="__metadata__")
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FileFormatError(path, f"entry must be an object with exactly dtype, shape and data_offsets, "
                                        f"got {info!r:.200}", key=key)
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or (dtype not in _DTYPES and dtype != _BF16):
            raise FileFormatError(path, f"unsupported dtype {dtype!r}; supported: {sorted(_DTYPES) + [_BF16]}",
                                  key=key)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise FileFormatError(path, f"shape must be a list of non-negative ints, got {shape!r:.200}", key=key)
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise FileFormatError(path, f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offs!r:.200}",
                                  key=key)
        itemsize = 2 if dtype == _BF16 else _DTYPES[dtype].itemsize
        nbytes = math.prod(shape) * itemsize
        if offs[1] - offs[0] != nbytes:
            raise FileFormatError(path, f"data_offsets {offs} span {offs[1] - offs[0]} bytes but dtype {dtype} "
                                        f"and shape {shape} need {nbytes}", key=key)
        if offs[1] > len(data):
            raise FileFormatError(path, f"truncated: data ends at byte {offs[1]} of the buffer but the file holds "
                                        f"only {len(data)} data bytes", key=key)
        spans.append((offs[0], offs[1], key))
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise FileFormatError(path, f"data_offsets {[begin, end]} {what} (tensors must tile the buffer)", key=key)
        pos = end
    if pos != len(data):
        raise FileFormatError(path, f"{len(data) - pos} trailing bytes after the last tensor (corrupted)")
    arrays = {}
    for begin, end, key in spans:
        info = header[key]
        if info["dtype"] == _BF16:
            bits = np.frombuffer(data[begin:end], dtype="<u2").astype(np.uint32) << 16
            a = bits.view(np.float32)
        else:
            a = np.frombuffer(data[begin:end], dtype=_DTYPES[info["dtype"]])
            a = a.astype(a.dtype.newbyteorder("="), copy=True)
        arrays[key] = a.reshape(info["shape"])
    return arrays, metadata


def load_safetensors(path, expected: Mapping[str, tuple] | None = None, *, allow_extra: bool = True,
                     allow_nonfinite: bool = True) -> dict:
    """Read a safetensors file completely and validate it; returns name -> NumPy array.

    expected: key -> (shape or None, dtype or None); every key must be present with that shape
              and dtype (a dtype may be a NumPy dtype, a name such as "float32", or a tuple of them).
    allow_extra: when False, keys not in ``expected`` are refused.
    allow_nonfinite: when False, a float array holding NaN or Inf is refused.
    Raises FileFormatError naming the file and the key.
    """
    arrays, _ = parse_safetensors(_read_file(path), path)
    if expected is not None:
        check_arrays(arrays, expected, path, allow_extra=allow_extra)
    if not allow_nonfinite:
        check_finite(arrays, path)
    return arrays


def check_finite(arrays: Mapping[str, np.ndarray], path, hint: str = "") -> None:
    """Every float array of ``arrays`` (key -> host array) is finite; else FileFormatError naming
    ``path``, the first key holding NaN or Inf and how many, then ``hint`` (what to do)."""
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise FileFormatError(path, f"holds {int((~np.isfinite(a)).sum())} non-finite values{hint}", key=key)


def _dtype_ok(actual: np.dtype, want) -> bool:
    wants = want if isinstance(want, tuple) else (want,)
    return any(actual == np.dtype(w) for w in wants)


def check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple], path,
                 allow_extra: bool = True) -> None:
    """Raise FileFormatError unless ``arrays`` holds every ``expected`` key with its shape and dtype."""
    missing = [k for k in expected if k not in arrays]
    if missing:
        raise FileFormatError(path, f"missing (the file holds {len(arrays)} tensors, e.g. {sorted(arrays)[:5]})",
                              key=missing[0])
    if not allow_extra:
        extra = sorted(set(arrays) - set(expected))
        if extra:
            raise FileFormatError(path, f"unexpected tensor (expected only {sorted(expected)[:5]}...)", key=extra[0])
    for key, (shape, dtype) in expected.items():
        a = arrays[key]
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise FileFormatError(path, f"shape {tuple(a.shape)}, expected {tuple(shape)}", key=key)
        if dtype is not None and not _dtype_ok(a.dtype, dtype):
            raise FileFormatError(path, f"dtype {a.dtype}, expected {dtype}", key=key)


# ------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------
def save_json(obj, path, sort_keys: bool = True) -> None:
    """Write ``obj`` as JSON to ``path``, atomically. Floats round-trip exactly (repr).
    ``sort_keys=False`` keeps dict order (a checkpoint's states: order can matter to their owner)."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=sort_keys, allow_nan=True).encode("utf-8"))


def parse_json(raw: bytes, path="<bytes>"):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FileFormatError(path, f"is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise FileFormatError(path, "JSON nested too deeply") from None
    except ValueError as exc:
        raise FileFormatError(path, f"is not valid JSON ({exc})") from None


def load_json(path, schema: Mapping[str, object] | None = None):
    """Read a JSON file; with ``schema`` (key -> type or tuple of types) it must be an object
    holding every key with a value of that type (bool is not accepted for int)."""
    obj = parse_json(_read_file(path), path)
    if schema is not None:
        check_json(obj, schema, path)
    return obj


def check_json(obj, schema: Mapping[str, object], path) -> None:
    if not isinstance(obj, dict):
        raise FileFormatError(path, f"must hold a JSON object, got {type(obj).__name__}")
    for key, types in schema.items():
        if key not in obj:
            raise FileFormatError(path, f"missing (keys present: {sorted(obj)[:10]})", key=key)
        require_type(obj[key], types, path, key)


def require_type(value, types, path, key: str):
    """Return ``value`` when it has one of ``types`` (bool never counts as int or float)."""
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise FileFormatError(path, f"expected {names}, got {type(value).__name__} {value!r:.80}", key=key)
    return value


__all__ = [
    "FileFormatError", "atomic_write_bytes", "fsync_dir", "safetensors_bytes", "save_safetensors",
    "parse_safetensors", "load_safetensors", "check_arrays", "save_json", "parse_json", "load_json",
    "check_json", "require_type",
]
