"""Data-parallel training over MPI (NCCL for device arrays): the communicator and the gradient reducer.

Launch: ``mpirun -n N spectral-peft run ...`` or ``mpirun -n N python script.py`` with a
:class:`~spectral_peft.train.Trainer` in the script (docs/distributed.md). :func:`world` reads the
launcher's environment (``OMPI_COMM_WORLD_SIZE`` or ``PMI_SIZE``): without one it returns
:data:`SINGLE` (rank 0 of 1, every collective a no-op) and mpi4py is never imported, so a plain
run is exactly the one-process engine.

What the Trainer reduces (spectral_peft/train.py, ``Trainer.train_step``): rank r trains on rows
r·B/N .. (r+1)·B/N − 1 of the global batch of B rows; its loss L_r is the mean over its own n_r
targets (``train.target_count``), so the one-process loss and gradient are

    L = Σ_r n_r L_r / Σ_r n_r            g = Σ_r n_r g_r / Σ_r n_r

:class:`GradientReducer` packs n_r·g_r of every trainable gradient, then n_r, n_r·L_r and one
non-finite flag per rank (slot r holds 1 when rank r's own loss or gradients are not finite: an
all-gather carried by the same sum) into contiguous buckets of at most ``bucket_bytes`` (25 MiB),
all-reduces each bucket in place, and writes g back into the gradient arrays. One collective per
bucket per step; a LoRA step is one bucket.

Overlap with the backward is not done. It pays when the gradient bytes take about as long to move
as the backward takes to compute (full fine-tuning of a large model: hundreds of MiB per step).
A LoRA/AdaLoRA/RoSA step moves a few hundred KiB to a few MiB, a fraction of a millisecond on
shared memory or NVLink against a backward of tens to hundreds of milliseconds, so starting the
first bucket early would save well under 1% of the step while forcing bucket boundaries to follow
the backward's layer order. ``ms_comm`` in the step metrics measures what there is to win.

Bitwise agreement across ranks. Every rank divides the same reduced sums, so the ranks step
identically as long as the all-reduce hands every rank the same bits: true for two ranks (float
addition is commutative), for NCCL's ring and for OpenMPI's tree and recursive-doubling sums
(their pairs are combined symmetrically). The ranks never drift apart for any other reason: the
parameters, optimiser, schedule and controllers see only reduced quantities.

Errors. Under mpirun an exception that escapes on one rank would leave the others waiting in a
collective; :func:`world` installs an ``excepthook`` (as ``python -m mpi4py`` does) that prints
the traceback, prefixed with the rank, and aborts the whole job. A :class:`LaunchError` (a bad
launch every rank detects identically: a batch not divisible by N, configs that differ) is
printed once, by rank 0, and every rank exits with status 1 without an abort.

Shape legend: a gradient keeps its parameter's shape; a bucket is a 1-D array of its dtype.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
import traceback

import numpy as np

from .backend import get_xp, is_device_array, to_host

LAUNCH_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
BUCKET_BYTES = 25 * 2**20


class LaunchError(ValueError):
    """A bad launch that every rank detects identically (raised on every rank; printed by rank 0)."""


class Communicator:
    """One process: rank 0 of 1, every collective a no-op (the contract every communicator keeps).

    ``allreduce_(a)``: in-place sum of a contiguous float array (NumPy or CuPy) over the ranks.
    ``allreduce_sum(x)``: the sum of a float or small array, returned. ``barrier()``,
    ``bcast(obj, root=0)``, ``allgather(obj) -> list`` (picklable objects)."""

    rank = 0
    size = 1
    name = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def allreduce_(self, array):
        return array

    def allreduce_sum(self, value):
        return value

    def barrier(self) -> None:
        pass

    def bcast(self, obj, root: int = 0):
        return obj

    def allgather(self, obj) -> list:
        return [obj]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


SINGLE = Communicator()


class MpiCommunicator(Communicator):
    """MPI_COMM_WORLD through mpi4py. Host (NumPy) arrays are reduced by MPI in place; CuPy arrays
    by NCCL (:class:`NcclReducer`, created collectively on first use), with no host copy; other
    device arrays (the gpu-emulated backend's) through a host copy."""

    name = "mpi"

    def __init__(self):
        from mpi4py import MPI  # here, not at the top: only under a launcher (module docstring)

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._nccl = None

    def allreduce_(self, array):
        if isinstance(array, np.ndarray):
            if not array.flags.c_contiguous:
                raise ValueError("allreduce_ needs a contiguous array (the reduction is in place)")
            self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
            return array
        if type(array).__module__.startswith("cupy"):
            if self._nccl is None:
                self._nccl = NcclReducer(self)
            return self._nccl.allreduce_(array)
        host = np.ascontiguousarray(to_host(array))  # an emulated device array: reduce a host copy
        self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        array[...] = get_xp(array).asarray(host)
        return array

    def allreduce_sum(self, value):
        if isinstance(value, (int, float, np.generic)):
            buf = np.array([value], dtype=np.float64)
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
            return float(buf[0])
        buf = np.array(to_host(value), dtype=np.float64, copy=True)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def barrier(self) -> None:
        """A barrier that sleeps while it waits (rank 0 may pretrain for minutes meanwhile: a
        spinning MPI_Barrier would take a core from it)."""
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(0.005)

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


_NCCL_DTYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}


class NcclReducer:
    """In-place sums of CuPy arrays through NCCL (cupy.cuda.nccl): rank 0 draws the unique id, MPI
    broadcasts it, every rank joins the clique on its current device. Collective: every rank
    builds it at the same point (the first device all-reduce). Each rank must be on its own GPU
    (:func:`bind_device`); NCCL refuses two ranks on one device."""

    def __init__(self, comm: MpiCommunicator):
        from cupy.cuda import nccl  # only for device arrays

        if not getattr(nccl, "available", True):
            raise RuntimeError("a device all-reduce needs NCCL, which this CuPy cannot load (libnccl.so.2); "
                               "install it (pip install nvidia-nccl-cu12) or train on --device cpu")
        self.nccl = nccl
        uid = nccl.get_unique_id() if comm.rank == 0 else None
        uid = comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)

    def allreduce_(self, array):
        import cupy

        if not array.flags.c_contiguous:
            raise ValueError("allreduce_ needs a contiguous array (the reduction is in place)")
        code = _NCCL_DTYPES.get(str(array.dtype))
        if code is None:
            raise TypeError(f"NCCL all-reduce of dtype {array.dtype}: use one of {sorted(_NCCL_DTYPES)}")
        stream = cupy.cuda.get_current_stream()
        self.comm.allReduce(array.data.ptr, array.data.ptr, array.size, getattr(self.nccl, code),
                            self.nccl.NCCL_SUM, stream.ptr)
        return array


def bind_device(comm: Communicator) -> int:
    """Make rank r use GPU (local rank mod device count) (the launcher's OMPI_COMM_WORLD_LOCAL_RANK,
    else the rank); returns the device index. Call before any device array is made."""
    import cupy

    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID", comm.rank)))
    index = local % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(index).use()
    return index


# ------------------------------------------------------------------------------------------------
# world() and the solo() context
# ------------------------------------------------------------------------------------------------
_WORLD: Communicator | None = None
_SOLO = 0


def launched() -> bool:
    """True when a launcher (mpirun, mpiexec, srun with PMI) started this process with N >= 1."""
    return any(os.environ.get(v) for v in LAUNCH_VARIABLES)


def world() -> Communicator:
    """The communicator of this process: :data:`SINGLE` without a launcher (mpi4py not imported)
    or inside :func:`solo`, else the MPI world (created once)."""
    global _WORLD
    if _SOLO or not launched():
        return SINGLE
    if _WORLD is None:
        try:
            comm = MpiCommunicator()
        except ImportError as exc:
            raise ImportError(f"this process was started by an MPI launcher but mpi4py is not installed ({exc}); "
                              "pip install 'spectral-peft[distributed]'") from None
        _WORLD = comm if comm.size > 1 else SINGLE
        if comm.size > 1:
            _install_excepthook(comm)
    return _WORLD


@contextlib.contextmanager
def solo():
    """Inside, :func:`world` is :data:`SINGLE`: work that one rank does alone (rank 0 pretraining
    the base) builds Trainers that reduce nothing."""
    global _SOLO
    _SOLO += 1
    try:
        yield
    finally:
        _SOLO -= 1


def _install_excepthook(comm: MpiCommunicator) -> None:
    def hook(kind, value, tb):
        if isinstance(value, LaunchError):  # every rank raised it: rank 0 says it, all exit 1
            if comm.is_main:
                print(f"error: {value}", file=sys.stderr, flush=True)
            return
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write("".join(f"[rank {comm.rank}] {line}\n" for line in text.rstrip().splitlines()))
        sys.stderr.flush()
        comm.abort(1)

    sys.excepthook = hook


# ------------------------------------------------------------------------------------------------
# Start-up checks
# ------------------------------------------------------------------------------------------------
def check_divisible(comm: Communicator, batch_size: int, what: str = "the global batch") -> int:
    """B / N, the rows of each rank; a LaunchError (on every rank) when N does not divide B."""
    if batch_size % comm.size:
        raise LaunchError(f"{what} of {batch_size} rows does not split over {comm.size} ranks: choose a batch "
                          f"size that is a multiple of {comm.size} (or launch with a number of ranks that divides "
                          f"{batch_size})")
    return batch_size // comm.size


def digest(obj) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys; non-JSON values by repr)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()


def check_same(comm: Communicator, what: str, fields: dict) -> None:
    """Every rank passes its ``fields`` (a flat dict); a LaunchError on every rank naming each rank
    and field that differs from rank 0's. One small allgather of digests, a second one of the fields
    only when they differ."""
    if comm.size == 1:
        return
    fields = _flat(fields)
    digests = comm.allgather(digest(fields))
    if len(set(digests)) == 1:
        return
    every = comm.allgather(fields)
    lines = []
    for r, theirs in enumerate(every[1:], start=1):
        for k in sorted(set(every[0]) | set(theirs), key=str):
            if every[0].get(k, "<missing>") != theirs.get(k, "<missing>"):
                lines.append(f"rank {r} has {k} = {theirs.get(k, '<missing>')!r:.60} where rank 0 has "
                             f"{every[0].get(k, '<missing>')!r:.60}")
    raise LaunchError(f"{what} differs across ranks (every rank must run the same job): " + "; ".join(lines[:6])
                      + (f"; and {len(lines) - 6} more" if len(lines) > 6 else ""))


def _flat(fields: dict, prefix: str = "") -> dict:
    """Nested dicts flattened to dotted keys (so a difference names the innermost field)."""
    out = {}
    for k, v in fields.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ------------------------------------------------------------------------------------------------
# Shards and the gradient reduction
# ------------------------------------------------------------------------------------------------
def shard_batch(batch: dict, comm: Communicator) -> dict:
    """Rank r's rows r·B/N .. (r+1)·B/N − 1 of every array with the batch's leading dimension B
    (input_ids (B, T), labels (B, T) or (B,), masks); other entries are passed as they are."""
    B = int(batch["input_ids"].shape[0])
    n = check_divisible(comm, B)
    lo, hi = comm.rank * n, (comm.rank + 1) * n
    return {k: v[lo:hi] if getattr(v, "ndim", 0) >= 1 and v.shape[0] == B else v for k, v in batch.items()}


class GradientReducer:
    """Σ_r n_r g_r / Σ_r n_r of every gradient in place, with the loss and per-rank flags (module
    docstring), in buckets of at most ``bucket_bytes``. Buffers are kept from step to step while the
    layout (the arrays' sizes and dtypes) is unchanged; a new layout is checked across ranks once.
    ``seconds`` accumulates the wall time of the reductions (packing, all-reduce, unpacking)."""

    def __init__(self, comm: Communicator, bucket_bytes: int = BUCKET_BYTES):
        if type(bucket_bytes) is not int or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be an int >= 1, got {bucket_bytes!r}")
        self.comm, self.bucket_bytes = comm, bucket_bytes
        self._layout = None
        self._buckets: list = []  # [(buffer, [(array index, offset, size)])]
        self.last_ms = 0.0

    def _plan(self, arrays: list, xp) -> None:
        layout = tuple((tuple(a.shape), str(a.dtype)) for a in arrays)
        if layout == self._layout:
            return
        check_same(self.comm, "the trainable gradients' layout",
                   {"count": len(layout), "digest": digest(layout)})
        groups: dict = {}
        for i, a in enumerate(arrays):
            groups.setdefault(str(a.dtype), []).append(i)
        extra = 2 + self.comm.size  # n_r, n_r·L_r, one flag per rank
        buckets = []
        for dtype, idx in sorted(groups.items()):
            cur, used = [], 0
            for i in idx:
                nbytes = arrays[i].size * arrays[i].itemsize
                if cur and used + nbytes > self.bucket_bytes:
                    buckets.append([dtype, cur])
                    cur, used = [], 0
                cur.append(i)
                used += nbytes
            buckets.append([dtype, cur])
        if not buckets:
            buckets = [["float64", []]]
        self._buckets = []
        for b, (dtype, idx) in enumerate(buckets):
            entries, offset = [], 0
            for i in idx:
                entries.append((i, offset, int(arrays[i].size)))
                offset += int(arrays[i].size)
            size = offset + (extra if b == len(buckets) - 1 else 0)  # the scalars ride in the last bucket
            self._buckets.append((xp.zeros(size, dtype=dtype), entries))
        self._layout = layout

    def reduce_(self, arrays: list, count: float, loss: float, bad: bool) -> tuple[float, float, list[int]]:
        """``arrays``: this rank's gradients g_r (each contiguous, shapes any), replaced in place by
        Σ n_r g_r / Σ n_r; ``count`` = n_r; ``loss`` = L_r; ``bad``: this rank's own loss or
        gradients are not finite. Returns (Σ n_r, Σ n_r L_r / Σ n_r, ranks that were bad)."""
        t0 = time.perf_counter()
        xp = get_xp(*arrays) if arrays else np
        self._plan(arrays, xp)
        size = self.comm.size
        for k, (buf, entries) in enumerate(self._buckets):
            for i, offset, n in entries:
                xp.multiply(arrays[i].reshape(-1), count, out=buf[offset:offset + n])  # n_r · g_r
            if k == len(self._buckets) - 1:
                tail = np.zeros(2 + size)
                tail[0], tail[1] = count, count * loss if math.isfinite(loss) else math.nan
                tail[2 + self.comm.rank] = 1.0 if bad else 0.0
                buf[buf.size - tail.size:] = xp.asarray(tail.astype(buf.dtype)) if is_device_array(buf) else tail
            self.comm.allreduce_(buf)
        tail = to_host(self._buckets[-1][0][-(2 + size):]).astype(np.float64)
        total = float(tail[0])
        bad_ranks = [r for r in range(size) if tail[2 + r] != 0.0]  # a NaN flag (sum of a NaN) counts too
        if total > 0:
            for buf, entries in self._buckets:
                for i, offset, n in entries:
                    a = arrays[i]
                    xp.divide(buf[offset:offset + n].reshape(a.shape), total, out=a)  # g = Σ n_r g_r / Σ n_r
        self.last_ms = 1e3 * (time.perf_counter() - t0)
        return total, (float(tail[1]) / total if total > 0 else math.nan), bad_ranks


# ------------------------------------------------------------------------------------------------
# Per-rank random streams
# ------------------------------------------------------------------------------------------------
def offset_streams(generators: dict, rank: int) -> None:
    """Rank r > 0 gets its own stream in every generator of ``generators`` ({key: numpy Generator},
    the model's dropout streams): a child seeded from (a draw of the stream, r). Rank 0 keeps the
    one-process stream."""
    if rank == 0:
        return
    for g in generators.values():
        seed = int(g.integers(2**63 - 1))
        g.bit_generator.state = type(g.bit_generator)(np.random.SeedSequence([seed, int(rank)])).state


__all__ = [
    "BUCKET_BYTES",
    "SINGLE",
    "Communicator",
    "GradientReducer",
    "LaunchError",
    "MpiCommunicator",
    "NcclReducer",
    "bind_device",
    "check_divisible",
    "check_same",
    "digest",
    "launched",
    "offset_streams",
    "shard_batch",
    "solo",
    "world",
]
