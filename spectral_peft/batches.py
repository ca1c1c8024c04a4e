"""Deterministic batches: the batch of step ``t`` is a pure function of (data, seed, t).

:class:`SeededBatches` draws the batch of step ``t`` from a generator seeded with ``(seed, t)``
alone, so a resumed run (spectral_peft.train.Trainer.resume) sees exactly the batches the
uninterrupted run saw, with no stream to fast-forward; its state (position and a fingerprint of
the data) goes into the checkpoint.

Shape legend: N examples, B batch, T sequence.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from .backend import to_host


def _host_array(value, name: str) -> np.ndarray:
    try:
        return np.asarray(to_host(value))
    except (ValueError, TypeError) as exc:  # ragged nested lists and the like
        raise ValueError(f"{name} must be an integer array, got a {type(value).__name__} that is not one ({exc})") \
            from None


class SeededBatches:
    """Batches reproducible from (seed, step).

    data: a 1-D integer token array (language modelling: each example is a window of ``seq_len``
          consecutive tokens, labels = input_ids, shifted inside the model as Hugging Face does),
          or a dict of arrays sharing their first dimension N (each example is one row of each,
          e.g. input_ids (N, T), attention_mask (N, T), labels (N,)); ``seq_len`` then must be
          None or <= T and truncates the (N, T) arrays.
    batch_size: B >= 1.  seq_len: T >= 1 (required for a token array).  seed: int >= 0.

    ``batch(t)`` is a pure function of (data, seed, t). Iterating yields batch(position),
    batch(position + 1), ...; ``state_dict()`` records the position and a fingerprint of the
    data, so a resume against other data is refused.
    """

    def __init__(self, data, batch_size: int, seq_len: int | None = None, seed: int = 0):
        if type(batch_size) is not int or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if type(seed) is not int or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if seq_len is not None and (type(seq_len) is not int or seq_len < 1):
            raise ValueError(f"seq_len must be None or an int >= 1, got {seq_len!r}")
        if isinstance(data, Mapping):
            if "input_ids" not in data:
                raise ValueError(f"data is a dict without 'input_ids' (keys {sorted(map(str, data))}); give at "
                                 "least input_ids (N, T)")
            arrays = {}
            for k, v in data.items():
                a = _host_array(v, f"data[{k!r}]")
                if a.ndim < 1 or a.dtype.kind not in "iub":
                    raise ValueError(f"data[{k!r}] must be an integer array with a leading example axis, got "
                                     f"shape {a.shape} dtype {a.dtype}")
                arrays[k] = a
            n = {k: a.shape[0] for k, a in arrays.items()}
            if len(set(n.values())) != 1 or next(iter(n.values())) == 0:
                raise ValueError(f"data arrays must share a non-zero first dimension N, got {n}")
            if seq_len is not None:
                for k, a in arrays.items():
                    if a.ndim == 2:
                        if seq_len > a.shape[1]:
                            raise ValueError(f"seq_len {seq_len} exceeds data[{k!r}]'s length {a.shape[1]}")
                        arrays[k] = a[:, :seq_len]
            self.num_examples = next(iter(n.values()))
            self.tokens = None
        else:
            a = _host_array(data, "data")
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise ValueError(f"data must be a 1-D integer token array or a dict of arrays, got shape "
                                 f"{a.shape} dtype {a.dtype}")
            if seq_len is None:
                raise ValueError("seq_len is required when data is a token array")
            if a.size < seq_len:
                raise ValueError(f"data holds {a.size} tokens, fewer than seq_len = {seq_len}")
            arrays = None
            self.tokens = a.astype(np.int64, copy=False)
            self.num_examples = a.size - seq_len + 1  # window starts
        self.arrays = arrays
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.position = 0
        h = hashlib.sha256()
        for k, a in sorted((arrays or {"tokens": self.tokens}).items()):
            h.update(k.encode())
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        self.fingerprint = h.hexdigest()

    def batch(self, step: int) -> dict:
        """The batch of step ``step``: dict of (B, T) / (B,) int64 host arrays."""
        if type(step) is not int and not isinstance(step, np.integer) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        rng = np.random.default_rng([self.seed, int(step)])
        idx = rng.integers(0, self.num_examples, size=self.batch_size)  # (B,)
        if self.tokens is not None:
            windows = idx[:, None] + np.arange(self.seq_len)[None, :]  # (B, T)
            ids = self.tokens[windows]
            return {"input_ids": ids, "labels": ids.copy()}
        return {k: a[idx].astype(np.int64) if a.dtype.kind != "b" else a[idx] for k, a in self.arrays.items()}

    def __iter__(self):
        while True:
            b = self.batch(self.position)
            self.position += 1
            yield b

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "position": self.position, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "seq_len", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"data state {key} = {state.get(key)!r:.70} but this data source has "
                                 f"{getattr(self, key)!r:.70}: resume with the same data, seed and shapes")
        pos = state.get("position")
        if type(pos) is not int or pos < 0:
            raise ValueError(f"data state position must be an int >= 0, got {pos!r}")
        self.position = pos


__all__ = ["SeededBatches"]
