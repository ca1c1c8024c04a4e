"""What the benchmarks share: the timing rule and the foundation benchmark model.

Timing: each repeat times every contender once, in turn, so that load from other processes on a shared
machine falls on all of them alike; the reported figure is the median over repeats. The minima
come back too: on a contended machine the minimum estimates the uncontended cost.
"""
from __future__ import annotations

import time

import numpy as np


def interleaved_ms(fns: dict, repeats: int, warmup: int = 1) -> tuple[dict, dict]:
    """({name: median ms}, {name: min ms}) of each zero-argument function in ``fns``."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    medians = {k: 1e3 * float(np.median(v)) for k, v in ts.items()}
    minima = {k: 1e3 * float(np.min(v)) for k, v in ts.items()}
    return medians, minima


# The foundation benchmark model (PERFORMANCE.md): GPT-2 shape, 4 layers, d_model 256, 4 heads,
# T 128, batch 8, vocabulary 512; dropout off so that both sides of a comparison compute the same.
BATCH, SEQ, VOCAB = 8, 128, 512


def benchmark_model_config():
    """The GPT2Config of the foundation benchmark model."""
    from spectral_peft.model import GPT2Config  # noqa: PLC0415

    return GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=SEQ, vocab_size=VOCAB, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)


def benchmark_batches(n: int = 4, seed: int = 0) -> list:
    """``n`` (BATCH, SEQ) int64 token batches, drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=(BATCH, SEQ)) for _ in range(n)]
