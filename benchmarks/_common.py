"""What the benchmarks share: the timing rule and the foundation benchmark model.

Timing: each repeat times every contender once, in turn, so that load from other processes on a shared
machine falls on all of them alike; the reported figure is the median over repeats. The minima
come back too: on a contended machine the minimum estimates the uncontended cost.

Allocator: importing this module calls spectral_peft.allocator.keep_freed_memory() (glibc keeps
freed activation memory for the next step instead of page-faulting fresh pages), unless the
environment sets SPECTRAL_PEFT_SYSTEM_MALLOC=1; ``KEEP_FREED_MEMORY`` says which ran, and the
benchmarks write it into their JSON line.

Peer timing: importing this module sets OMP_WAIT_POLICY=PASSIVE (unless the environment already
sets it) before any benchmark imports torch. Under libgomp's default policy torch's OpenMP threads
spin for a while after each parallel region, so on a 2-core machine the engine step timed right
after the torch step shared the cores with them: the LoRA step read 147.0 ms after a torch step
against 134.1 ms after an engine step (+10%; PASSIVE: 133.3 and 133.7), which biased time_pair's
`ratio` and `gemm_fraction`. Passive threads sleep at once; torch's own step is not slowed (226.8
ms passive, 227.4 ms default; docs/performance.md). ``OMP_WAIT_POLICY`` says which ran; the
benchmarks write it into their JSON line. OMP_WAIT_POLICY= (empty: libgomp warns and keeps its
default) reproduces the old pairing; ACTIVE (spin without end) slows every engine step ~3x.
"""
from __future__ import annotations

import os
import time

import numpy as np

from spectral_peft.allocator import keep_freed_memory

# before torch is imported (every benchmark imports it lazily, after this module): see the docstring
OMP_WAIT_POLICY = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

KEEP_FREED_MEMORY = os.environ.get("SPECTRAL_PEFT_SYSTEM_MALLOC") != "1" and keep_freed_memory()


CLOCK = time.perf_counter  # wall clock; set_cpu_clock() switches to the process's CPU time


def set_cpu_clock() -> None:
    """Time with process CPU time (user + system, every thread) instead of the wall clock: on a
    machine other processes load, CPU time does not count the time this process waits for a core
    (with 1 BLAS thread it is the work done; with more it also counts BLAS threads spinning)."""
    global CLOCK
    CLOCK = time.process_time


def interleaved_ms(fns: dict, repeats: int, warmup: int = 1) -> tuple[dict, dict]:
    """({name: median ms}, {name: min ms}) of each zero-argument function in ``fns`` (``CLOCK``)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = CLOCK()
            f()
            ts[k].append(CLOCK() - t0)
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


# --- the engine-vs-PEFT training step (benchmarks/lora.py, llama.py, gpu_step.py) ------------------
def optimizers(pm, pm_t, lr: float, weight_decay: float):
    """(engine AdamW, torch AdamW) over the adapter parameters of the engine's PeftModel ``pm`` and
    PEFT's ``pm_t`` (both put in training mode); refuses when the trainable counts differ."""
    import torch  # noqa: PLC0415

    from spectral_peft.optim import AdamW  # noqa: PLC0415

    pm.train()
    pm_t.train()
    n_e = pm.num_parameters(trainable_only=True)
    n_t = sum(p.numel() for p in pm_t.parameters() if p.requires_grad)
    if n_e != n_t:
        raise RuntimeError(f"trainable parameters differ: engine {n_e}, PEFT {n_t}")
    return (AdamW(pm, lr=lr, weight_decay=weight_decay),
            torch.optim.AdamW([p for p in pm_t.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay))


def engine_step(pm, opt, ids):
    """One engine training step (forward with labels, backward, AdamW, zero_grad) -> its loss."""
    out = pm.forward(ids, labels=ids)
    pm.backward()
    opt.step()
    opt.zero_grad()
    return float(out.loss)


def torch_step(pm_t, topt, ids_t):
    """The same step on the transformers + PEFT side -> its loss."""
    out = pm_t(input_ids=ids_t, labels=ids_t)
    out.loss.backward()
    topt.step()
    topt.zero_grad(set_to_none=True)
    return float(out.loss)


def time_pair(pm, opt, pm_t, topt, ids, repeats: int, warmup: int = 2):
    """({engine, torch} median ms, minima, first engine loss, first torch loss): the first step
    runs on identical weights on both sides, then warm-up, then the interleaved timing."""
    import torch  # noqa: PLC0415

    ids_t = torch.tensor(ids)
    loss_e = engine_step(pm, opt, ids)
    loss_t = torch_step(pm_t, topt, ids_t)
    for _ in range(warmup - 1):
        engine_step(pm, opt, ids)
        torch_step(pm_t, topt, ids_t)
    ms, mins = interleaved_ms({"engine": lambda: engine_step(pm, opt, ids),
                               "torch": lambda: torch_step(pm_t, topt, ids_t)}, repeats, warmup=0)
    return ms, mins, loss_e, loss_t
