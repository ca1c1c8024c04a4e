"""Performance metrics of a training run, one JSON line per step: time, throughput and memory.

:class:`MetricsLog` is the Trainer's ``metrics_log`` hook: after every step the Trainer calls
``log(trainer, metrics)`` with the step's metrics (step, loss, lr, ms, tokens, tokens_per_s,
activation_bytes, skipped, d2h, h2d, and the ms split into forward/backward/optimizer/comm), merges
the fields it returns into them, and calls ``log.close()`` when ``fit`` ends. The fields it adds:

    param_bytes       parameters, frozen and trainable (quantised codes as stored)
    grad_bytes        gradient buffers of the trainable parameters
    optimizer_bytes   optimiser slots (AdamW's exp_avg and exp_avg_sq)
    kv_cache_bytes    a KVCache the log was given (0 in training: the forward keeps none)
    peak_rss_bytes    the process's peak resident set (getrusage's ru_maxrss, KiB on Linux)
    device_bytes      bytes in use in CuPy's memory pool on a GPU backend; None elsewhere

activation_bytes is the Trainer's own (what the caches held right after the forward). The three
memory_report figures change only when arrays are allocated (gradients at the first zero_grad,
AdamW's moments at the first step); the report is cached and recomputed when the optimiser's
state grows, so a step costs a getrusage and one line of JSON: about 60 µs on the benchmark
model (whose step takes 160 ms), where memory_report alone takes 0.7 ms. TensorBoard adds about
0.1 ms per scalar (its writer's queue), 2 ms for a step's 20 scalars.

Each line is the step's metrics plus these fields plus the log's constant ``fields`` (a run adds
``method``), written to ``path`` (``metrics.jsonl`` beside a run's results.json) and flushed, so
the file can be followed while the run goes on. Non-finite floats (the loss of a skipped step) are
written as null: JSON has no NaN. With ``tensorboard_dir`` every numeric field is also written as
a TensorBoard scalar of the same name at the step. Under several ranks only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys

import numpy as np

from .memory import memory_report

METRICS_FILE = "metrics.jsonl"  # beside results.json in a run folder
MEMORY_FIELDS = ("param_bytes", "grad_bytes", "optimizer_bytes")  # memory_report's, cached


def peak_rss_bytes() -> int:
    """The peak resident set of this process in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def device_bytes(backend) -> int | None:
    """Bytes in use in CuPy's default memory pool when ``backend`` is the GPU; None elsewhere
    (the CPU, and the emulated GPU, whose arrays are NumPy's)."""
    if getattr(backend, "device", "cpu") != "gpu":
        return None
    import cupy  # noqa: PLC0415 - only a GPU backend has a pool to read

    return int(cupy.get_default_memory_pool().used_bytes())


def _tensorboard_writer(folder: str):
    try:
        from tensorboard.summary import Writer  # noqa: PLC0415 - an optional dependency
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"--tensorboard {folder}: the tensorboard package is not installed; "
                                  "pip install tensorboard (or leave --tensorboard out)") from None
    os.makedirs(folder, exist_ok=True)
    return Writer(folder)


def _json_value(value):
    """A JSON-able value: NumPy scalars as Python numbers, non-finite floats as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


class MetricsLog:
    """Per-step metrics to a JSON-lines file (and TensorBoard); the Trainer's ``metrics_log``.

    path: the file the lines are appended to (created with its folder). model, optimizer: what
    memory_report measures. comm: a Communicator (spectral_peft.distributed); only its rank 0
    writes when comm.size > 1, every rank computes and returns the fields. tensorboard_dir: also
    write scalar event files there (needs the tensorboard package). kv_cache: a KVCache whose bytes
    are reported (None: 0). fields: constants written into every line (e.g. {"method": "lora"}).
    """

    def __init__(self, path, model, optimizer, comm=None, tensorboard_dir=None, kv_cache=None,
                 fields: dict | None = None):
        self.path, self.model, self.optimizer, self.kv_cache = os.fspath(path), model, optimizer, kv_cache
        self.fields = dict(fields or {})
        self.tensorboard_dir = None if tensorboard_dir is None else os.fspath(tensorboard_dir)
        self.writes = comm is None or comm.size == 1 or comm.rank == 0
        self._memory: dict | None = None
        self._memory_key = None
        self._file = self._tb = None
        if self.writes:
            self._open()

    def _open(self) -> None:
        """Open the file for appending (and the TensorBoard writer): at construction, so a missing
        package fails before any step, and again after close() when a later fit() writes on."""
        if self.tensorboard_dir is not None:
            self._tb = _tensorboard_writer(self.tensorboard_dir)
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def memory(self) -> dict:
        """{param_bytes, grad_bytes, optimizer_bytes}: memory_report's, recomputed only when the
        optimiser's state has grown (slots are allocated on the first step) since the last call."""
        state = getattr(self.optimizer, "state", {})
        key = (len(state), sum(len(slots) for slots in state.values()),
               getattr(self.optimizer, "step_count", None) == 0)
        if self._memory is None or key != self._memory_key:
            report = memory_report(self.model, self.optimizer)
            self._memory = {k: int(report[k]) for k in MEMORY_FIELDS}
            self._memory_key = key
        return dict(self._memory)

    def __call__(self, trainer, metrics: dict) -> dict:
        """The fields this log adds to ``metrics`` (the step's); writes the merged line."""
        extra = self.memory()
        extra["kv_cache_bytes"] = int(self.kv_cache.nbytes) if self.kv_cache is not None else 0
        extra["peak_rss_bytes"] = peak_rss_bytes()
        extra["device_bytes"] = device_bytes(getattr(self.model, "backend", None))
        if self.writes:
            self.write({**self.fields, **metrics, **extra})
        return extra

    def write(self, line: dict) -> None:
        """Append one line (flushed) and its numeric fields as TensorBoard scalars."""
        record = _json_value(line)
        if self._file is None:
            self._open()
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        """Close the file and the TensorBoard writer (the Trainer's fit does, when it ends); a
        second call does nothing, and a later step opens them again, appending."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def load_metrics(path) -> list[dict]:
    """The lines of a metrics.jsonl, in order (a final line cut short by a killed run is dropped)."""
    lines = []
    with open(path, encoding="utf-8") as f:
        rows = f.read().splitlines()
    for i, row in enumerate(rows):
        if not row.strip():
            continue
        try:
            lines.append(json.loads(row))
        except json.JSONDecodeError as exc:
            if i == len(rows) - 1:
                break  # the run was stopped mid-write
            raise ValueError(f"{path}: line {i + 1} is not JSON ({exc})") from None
    return lines
