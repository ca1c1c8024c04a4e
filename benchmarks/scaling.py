"""Data-parallel scaling on paper: a measured all-reduce, a fitted ring cost model, and the step
time and efficiency it predicts for LoRA's and full fine-tuning's gradients on 1 to 1024 ranks.

(a) All-reduce, measured: the script re-launches itself under ``mpirun -n 2`` (with
    --allow-run-as-root --oversubscribe) and times mpi4py's in-place ``Allreduce`` (sum) of
    float32 and float64 buffers from 1 KiB to 64 MiB: each repeat starts at a barrier, its time is
    the slower rank's, the figure is the median over repeats.
(b) The ring model, fitted: a ring all-reduce of S bytes over N ranks sends 2(N−1)/N · S bytes
    per rank (reduce-scatter, then all-gather), so

        t(N, S) = α + 2(N−1)/N · S / β          α: latency (s), β: bandwidth (bytes/s)

    fitted by least squares on the 2-rank medians (t = α + S/β at N = 2), with each residual
    divided by its measured time: the sizes span five decades, and an unweighted fit would let
    the 64 MiB point alone decide α. A ring's latency term really grows with N (2(N−1) messages
    in sequence, α/2 each at N = 2); the table shows that variant too (``per-hop``), the honest
    bound for small gradients on many ranks (tree all-reduces, as in NCCL, bring it to log N).
(c) Compute, measured: one engine training step (forward, backward, AdamW, zero_grad; float32,
    one process) of the benchmark model of benchmarks/lora.py (GPT-2, 4 layers, d 256, T 128,
    batch 8; LoRA r 8 on c_attn, c_proj, c_fc) and of full fine-tuning of the same model, timed
    in turn (benchmarks/_common.py), and the bytes of each one's gradients.
(d) Weak scaling, predicted: each rank keeps the batch of 8, so its compute stays the measured
    step; a step on N ranks costs compute + t(N, gradient bytes) (no overlap of the all-reduce
    with the backward assumed: the pessimistic case), efficiency = compute / step(N). The compute
    is the fastest of the timed steps: on a shared machine the minimum estimates the uncontended
    cost (benchmarks/_common.py); the medians are printed beside it. Since this CPU engine's step
    is slow, the table also says how short a step may be before the all-reduce costs 10%.

The α, β measured here are those of two processes on one machine (shared memory). The table also
shows a 100 Gb/s network link (α = 10 µs, β = 12.5 GB/s): an assumption, not a measurement, to
show what leaving the machine costs. ``--alpha/--beta`` extrapolate with other values.

(d') End to end: :func:`weak_scaling_end_to_end` trains with the Trainer under ``mpirun -n N``
    (per-rank batch fixed, global batch N · 8) and reports tokens/s and the communication share
    from the Trainer's metrics (ms, ms_comm); ``--end_to_end`` runs it for N = 1 and 2, one BLAS
    thread per rank. ms_comm holds the wait for the slower rank as well as the transfer.

Prints the tables, writes figures/scaling.png, and ends with ONE JSON line: alpha_s,
beta_bytes_per_s, the measured 2-rank medians, per-N step time and efficiency for lora and full.

Run: python benchmarks/scaling.py [--repeats N] [--out figures/scaling.png] [--end_to_end]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _threads import THREADS  # noqa: E402,F401  (benchmarks/_threads.py: before NumPy loads BLAS)

import numpy as np  # noqa: E402
from _common import BATCH, SEQ, VOCAB, benchmark_batches, benchmark_model_config, engine_step, interleaved_ms  # noqa: E402
from lora import ALPHA, LR, R, TARGETS, WD  # noqa: E402  (benchmarks/lora.py: the LoRA of the benchmark model)

from spectral_peft.adapters.lora import LoraConfig  # noqa: E402
from spectral_peft.adapters.peft_model import get_peft_model  # noqa: E402
from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.memory import memory_report  # noqa: E402
from spectral_peft.model import GPT2LMHeadModel  # noqa: E402
from spectral_peft.optim import AdamW  # noqa: E402
from spectral_peft.plots.common import color, pyplot, save  # noqa: E402
from spectral_peft.train import SeededBatches, Trainer  # noqa: E402

HERE = os.path.abspath(__file__)
SIZES = [2**k for k in range(10, 27, 2)]  # 1 KiB ... 64 MiB, factors of 4
RANKS = [2**k for k in range(11)]  # 1 ... 1024
NETWORK = {"alpha_s": 10e-6, "beta_bytes_per_s": 12.5e9}  # a 100 Gb/s link: assumed, not measured
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]


def under_mpirun() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))


# --- (a) the all-reduce, measured under mpirun ----------------------------------------------------
def allreduce_worker(out: str, rounds: int, exact: list[int]) -> None:
    """Under mpirun: the median and minimum seconds of one in-place Allreduce of each buffer —
    float32 and float64 over SIZES, and float32 of the ``exact`` byte counts (the gradients of
    (c)) — written by rank 0 to ``out``. Each round times every buffer once, in turn (load from
    other processes falls on all sizes alike); a buffer under 1 MiB is reduced k times in a row
    per timing (k = 1 MiB / size, at most 64) and the time divided by k."""
    from mpi4py import MPI  # noqa: PLC0415 - only under mpirun

    comm = MPI.COMM_WORLD
    cases = [(dt, size) for dt in ("float32", "float64") for size in SIZES] + [("exact", size) for size in exact]
    bufs = {c: np.ones(c[1] // np.dtype("float32" if c[0] == "exact" else c[0]).itemsize,
                       dtype="float32" if c[0] == "exact" else c[0]) for c in cases}
    ts = {c: [] for c in cases}
    for r in range(rounds + 2):
        for c in cases:
            k = max(1, min(64, 2**20 // c[1]))
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(k):
                comm.Allreduce(MPI.IN_PLACE, bufs[c], op=MPI.SUM)
            dt = comm.allreduce((time.perf_counter() - t0) / k, op=MPI.MAX)  # the slower rank's time
            if r >= 2:  # two warm-up rounds
                ts[c].append(dt)
    result = {"median_s": {}, "min_s": {}}
    for (dt, size), v in ts.items():
        result["median_s"].setdefault(dt, {})[str(size)] = float(np.median(v))
        result["min_s"].setdefault(dt, {})[str(size)] = float(np.min(v))
    if comm.rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"world_size": comm.size, "rounds": rounds, **result}, f)


def measure_allreduce(rounds: int, exact: list[int], n: int = 2, timeout: int = 600) -> dict:
    """{"median_s"|"min_s": {"float32"|"float64"|"exact": {bytes: s}}} of the Allreduce on ``n``
    ranks (re-launches this script under mpirun)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "allreduce.json")
        cmd = MPIRUN + ["-n", str(n), sys.executable, HERE, "--worker", "allreduce", "--worker_out", out,
                        "--rounds", str(rounds), "--threads", "1", "--exact", ",".join(map(str, exact))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        with open(out, encoding="utf-8") as f:
            data = json.load(f)
    return {stat: {dt: {int(s): t for s, t in v.items()} for dt, v in data[stat].items()}
            for stat in ("median_s", "min_s")}


# --- (b) the ring model ---------------------------------------------------------------------------
def ring_time(n: int, nbytes: float, alpha: float, beta: float, per_hop: bool = False) -> float:
    """t(N, S) = α + 2(N−1)/N · S/β (0 on one rank); per_hop: the latency is (N−1)·α instead
    (2(N−1) messages of α/2 each, α/2 being one message's latency at N = 2)."""
    if n == 1:
        return 0.0
    latency = (n - 1) * alpha if per_hop else alpha
    return latency + 2 * (n - 1) / n * nbytes / beta


def fit_ring(*medians: dict) -> tuple[float, float]:
    """(α s, β bytes/s) from 2-rank {bytes: seconds} tables: least squares of t = α + S/β over
    every point, with residuals relative to t (each row of the system divided by its measured time)."""
    points = [(float(s), t) for m in medians for s, t in m.items()]
    S = np.array([s for s, _ in points])
    t = np.array([t for _, t in points])
    A = np.stack([np.ones_like(S), S], axis=1) / t[:, None]  # (k, 2): [1, S] / t
    (alpha, inv_beta), *_ = np.linalg.lstsq(A, np.ones_like(S), rcond=None)  # [1, S]/t · (α, 1/β) ≈ 1
    return float(alpha), float(1.0 / inv_beta)


# --- (c) compute, measured in this process --------------------------------------------------------
def measure_steps(repeats: int) -> dict:
    """{"lora"|"full": {"ms": median step ms, "min_ms": the fastest, "grad_bytes": bytes of the
    gradients, "params": n}}."""
    ids = benchmark_batches(1, seed=1)[0]
    be = get_backend("cpu", "float32")
    lora = get_peft_model(GPT2LMHeadModel(benchmark_model_config(), be, seed=0),
                          LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS), seed=0)
    full = GPT2LMHeadModel(benchmark_model_config(), be, seed=0)
    runs = {}
    for name, model in (("lora", lora), ("full", full)):
        model.train()
        runs[name] = (model, AdamW(model, lr=LR, weight_decay=WD))
    fns = {name: (lambda m=m, o=o: engine_step(m, o, ids)) for name, (m, o) in runs.items()}
    ms, mins = interleaved_ms(fns, repeats, warmup=2)
    out = {}
    for name, (model, opt) in runs.items():
        rep = memory_report(model, opt)
        out[name] = {"ms": ms[name], "min_ms": mins[name], "grad_bytes": rep["grad_bytes"],
                     "params": rep["trainable_params"]}
    return out


# --- (d) weak scaling, predicted ------------------------------------------------------------------
def predict(compute_ms: float, grad_bytes: int, alpha: float, beta: float, per_hop: bool = False) -> dict:
    """{N: {"step_ms", "comm_ms", "efficiency"}} for N in RANKS: weak scaling, compute fixed per rank."""
    out = {}
    for n in RANKS:
        comm = 1e3 * ring_time(n, grad_bytes, alpha, beta, per_hop)
        out[n] = {"step_ms": compute_ms + comm, "comm_ms": comm, "efficiency": compute_ms / (compute_ms + comm)}
    return out


# --- (d') weak scaling, end to end ----------------------------------------------------------------
def train_worker(out: str, steps: int) -> None:
    """Under mpirun (or alone): LoRA on the benchmark model with the Trainer, per-rank batch BATCH
    (global batch N · BATCH); rank 0 writes the median ms, ms_comm and tokens/s of the steps after
    the first two to ``out``."""
    from spectral_peft import distributed  # noqa: PLC0415 - imports mpi4py under mpirun only

    comm = distributed.world()
    model = get_peft_model(GPT2LMHeadModel(benchmark_model_config(), get_backend("cpu", "float32"), seed=0),
                           LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS), seed=0)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=200_000)
    trainer = Trainer(model, AdamW(model, lr=LR, weight_decay=WD), comm=comm)
    hist = trainer.fit(SeededBatches(tokens, BATCH * comm.size, seq_len=SEQ, seed=0), steps)[2:]
    if comm.is_main:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"world_size": comm.size, **{k: float(np.median([m[k] for m in hist]))
                                                  for k in ("ms", "ms_comm", "tokens_per_s")}}, f)


def weak_scaling_end_to_end(n: int, steps: int = 12, timeout: int = 600) -> dict:
    """{"world_size", "ms", "ms_comm", "tokens_per_s", "comm_share"} of LoRA trained by the Trainer
    on ``n`` ranks (mpirun, one BLAS thread per rank), per-rank batch fixed at BATCH."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "train.json")
        cmd = [sys.executable, HERE, "--worker", "train", "--worker_out", out, "--steps", str(steps),
               "--threads", "1"]
        if n > 1:
            cmd = MPIRUN + ["-n", str(n)] + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        with open(out, encoding="utf-8") as f:
            rec = json.load(f)
    rec["comm_share"] = rec["ms_comm"] / rec["ms"]
    return rec


# --- the figure -----------------------------------------------------------------------------------
def plot(medians: dict, alpha: float, beta: float, steps: dict, links: dict, path: str) -> None:
    """Three panels. Left: the measured 2-rank all-reduce medians and the fitted line. Middle: the
    all-reduce of LoRA's and full fine-tuning's gradients against N, for each link of ``links``
    ({name: (α, β, per_hop)}). Right: the efficiency on 1024 ranks against the compute of a step,
    with this engine's measured CPU steps marked: where data parallelism is nearly free."""
    plt = pyplot()
    fig, (ax_t, ax_n, ax_e) = plt.subplots(1, 3, figsize=(16, 4.4))
    for dtype, marker in (("float32", "o"), ("float64", "s")):
        m = medians[dtype]
        ax_t.loglog(sorted(m), [1e6 * m[s] for s in sorted(m)], marker, ms=5, mfc="none",
                    label=f"measured, {dtype} (median)")
    S = np.geomspace(SIZES[0], SIZES[-1], 100)
    ax_t.loglog(S, 1e6 * (alpha + S / beta), "-", color="#555555", lw=1.2,
                label=f"fit α + S/β: α {1e6 * alpha:.2f} µs, β {beta / 1e9:.2f} GB/s")
    for name in steps:
        ax_t.axvline(steps[name]["grad_bytes"], color=color(name), ls=":", lw=1)
    ax_t.set_xlabel("buffer bytes S (dotted: LoRA's and full FT's gradients)")
    ax_t.set_ylabel("all-reduce time (µs)")
    ax_t.set_title("mpi4py Allreduce, 2 ranks on this machine")
    ax_t.legend(fontsize=8)
    styles = dict(zip(links, ("-", ":", "--")))
    titles = {"lora": "LoRA", "full": "full FT"}
    ns = np.array(RANKS[1:])
    for name in steps:
        g = steps[name]["grad_bytes"]
        for link, (al, be, per_hop) in links.items():
            ax_n.loglog(ns, [1e3 * ring_time(n, g, al, be, per_hop) for n in ns], styles[link], color=color(name),
                        marker=".", label=f"{titles[name]} ({g / 2**20:.2f} MiB), {link}")
    ax_n.set_xscale("log", base=2)
    ax_n.set_xlabel("ranks N")
    ax_n.set_ylabel("all-reduce per step (ms)")
    ax_n.set_title("ring model: t = α + 2(N−1)/N · S/β")
    ax_n.legend(fontsize=7)
    compute = np.geomspace(0.1, 1000, 200)  # ms
    n = RANKS[-1]
    for name in steps:
        g = steps[name]["grad_bytes"]
        for link, (al, be, per_hop) in links.items():
            comm = 1e3 * ring_time(n, g, al, be, per_hop)
            ax_e.semilogx(compute, compute / (compute + comm), styles[link], color=color(name),
                          label=f"{titles[name]}, {link}")
        ax_e.axvline(steps[name]["min_ms"], color=color(name), ls="-.", lw=0.8)
    ax_e.axhline(0.9, color="#999999", lw=0.8)
    ax_e.set_xlabel("compute per step and rank (ms; dash-dot: this engine's CPU step)")
    ax_e.set_ylabel(f"efficiency on {n} ranks: compute / step")
    ax_e.set_ylim(0, 1.02)
    ax_e.set_title(f"weak scaling on {n} ranks")
    ax_e.legend(fontsize=7)
    for ax in (ax_t, ax_n, ax_e):
        ax.grid(alpha=0.3, which="both")
    save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9, help="step-time repeats")
    p.add_argument("--rounds", type=int, default=40, help="all-reduce rounds (each times every buffer once)")
    p.add_argument("--threads", type=int, default=2, help="BLAS threads of the step timing (default 2)")
    p.add_argument("--out", default=os.path.join("figures", "scaling.png"))
    p.add_argument("--alpha", type=float, default=None, help="extrapolate with this α (s) instead of the fit")
    p.add_argument("--beta", type=float, default=None, help="extrapolate with this β (bytes/s) instead of the fit")
    p.add_argument("--end_to_end", action="store_true", help="also train LoRA with the Trainer on 1 and 2 ranks")
    p.add_argument("--steps", type=int, default=12, help="steps of each --end_to_end run")
    p.add_argument("--worker", choices=("allreduce", "train"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--exact", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "allreduce":
        allreduce_worker(args.worker_out, args.rounds, [int(b) for b in args.exact.split(",") if b])
        return 0
    if args.worker == "train":
        train_worker(args.worker_out, args.steps)
        return 0
    load_before = os.getloadavg()[0]  # other processes on this machine: the timings' context
    steps = measure_steps(args.repeats)
    for name, s in steps.items():
        print(f"engine step, {name}: {s['ms']:.1f} ms median ({s['min_ms']:.1f} min), {s['params']} trainable "
              f"parameters, gradients {s['grad_bytes'] / 2**20:.2f} MiB (float32, batch {BATCH}, T {SEQ}, "
              f"{THREADS} threads)")
    measured = measure_allreduce(args.rounds, [steps[name]["grad_bytes"] for name in steps])
    medians, minima = measured["median_s"], measured["min_s"]
    exact, exact_min = medians.pop("exact"), minima.pop("exact")
    alpha, beta = fit_ring(medians["float32"], medians["float64"])  # the cost is in bytes: both dtypes, one fit
    fit32, fit64 = fit_ring(medians["float32"]), fit_ring(medians["float64"])
    fit_min = fit_ring(minima["float32"], minima["float64"])
    print(f"mpi4py Allreduce (in place, sum), 2 ranks on this machine: median µs of {args.rounds} rounds")
    print(f"  {'bytes':>10} {'float32':>10} {'float64':>10} {'fit':>10}")
    for s in SIZES:
        print(f"  {s:>10} {1e6 * medians['float32'][s]:>10.1f} {1e6 * medians['float64'][s]:>10.1f} "
              f"{1e6 * (alpha + s / beta):>10.1f}")
    print(f"ring fit t = α + S/β, both dtypes: α = {1e6 * alpha:.2f} µs, β = {beta / 1e9:.3f} GB/s "
          f"(float32 alone: α = {1e6 * fit32[0]:.2f} µs, β = {fit32[1] / 1e9:.3f} GB/s; float64 alone: "
          f"α = {1e6 * fit64[0]:.2f} µs, β = {fit64[1] / 1e9:.3f} GB/s)")
    print(f"  the same fit on the minima (the uncontended estimate): α = {1e6 * fit_min[0]:.2f} µs, "
          f"β = {fit_min[1] / 1e9:.3f} GB/s")
    a = alpha if args.alpha is None else args.alpha
    b = beta if args.beta is None else args.beta
    rel = [abs(alpha + sz / beta - t) / t for m in medians.values() for sz, t in m.items()]
    print(f"  the fit is within {100 * max(rel):.0f}% of every point (median {100 * float(np.median(rel)):.0f}%)")
    for name in steps:
        g = steps[name]["grad_bytes"]
        print(f"  {name}'s gradients, {g} bytes: measured {1e6 * exact[g]:.1f} µs (min {1e6 * exact_min[g]:.1f}), "
              f"fit {1e6 * (alpha + g / beta):.1f} µs")

    links = {"measured": (a, b, False), "measured, per-hop": (a, b, True),
             "100 Gb/s link": (NETWORK["alpha_s"], NETWORK["beta_bytes_per_s"], False)}
    predictions = {(name, link): predict(steps[name]["min_ms"], steps[name]["grad_bytes"], al, be, ph)
                   for name in steps for link, (al, be, ph) in links.items()}
    print("weak scaling predicted (per-rank batch fixed): all-reduce ms / efficiency")
    head = "".join(f" {f'{n}':>13}" for n in RANKS)
    for link in links:
        print(f"  [{link}]  N:{head}")
        for name in steps:
            pred = predictions[(name, link)]
            cells = "".join(f" {pred[n]['comm_ms']:>6.2f}/{pred[n]['efficiency']:.3f}" for n in RANKS)
            print(f"  {name:>5} {' ' * (len(link) - 3)}{cells}")
    need = {(name, link): 9 * predictions[(name, link)][RANKS[-1]]["comm_ms"] for name in steps for link in links}
    print(f"compute a step needs for 90% efficiency on {RANKS[-1]} ranks (9 × its all-reduce):")
    for link in links:
        print(f"  [{link}] " + ", ".join(f"{name} {need[(name, link)]:.2f} ms" for name in steps))
    plot(medians, alpha, beta, steps, links, args.out)
    print(f"wrote {args.out}")

    end_to_end = None
    if args.end_to_end:
        end_to_end = [weak_scaling_end_to_end(n, args.steps) for n in (1, 2)]
        for rec in end_to_end:
            print(f"end to end, {rec['world_size']} rank(s): {rec['ms']:.1f} ms/step, {rec['tokens_per_s']:.0f} "
                  f"tokens/s, communication {100 * rec['comm_share']:.1f}% of the step")

    def per_n(name, link):
        return {str(n): {"step_ms": round(v["step_ms"], 3), "efficiency": round(v["efficiency"], 5)}
                for n, v in predictions[(name, link)].items()}

    def kind_record(kind: str) -> dict:
        """The JSON fields of one kind of training (LoRA or full fine-tuning)."""
        step, size = steps[kind], steps[kind]["grad_bytes"]
        return {"step_ms": step["ms"], "step_min_ms": step["min_ms"], "grad_bytes": size,
                "allreduce_2rank_s": exact[size], "allreduce_2rank_min_s": exact_min[size],
                "compute_ms_for_90pct_at_1024": need[(kind, "measured")],
                "efficiency": per_n(kind, "measured"), "efficiency_per_hop": per_n(kind, "measured, per-hop"),
                "efficiency_100gbps": per_n(kind, "100 Gb/s link")}

    print(json.dumps({
        "benchmark": "scaling", "alpha_s": alpha, "beta_bytes_per_s": beta,
        "alpha_s_float32": fit32[0], "beta_bytes_per_s_float32": fit32[1],
        "alpha_s_float64": fit64[0], "beta_bytes_per_s_float64": fit64[1],
        "allreduce_2rank_median_s": {dt: {str(s): v for s, v in m.items()} for dt, m in medians.items()},
        "fit_max_rel_error": max(rel), "alpha_s_minima": fit_min[0], "beta_bytes_per_s_minima": fit_min[1],
        "allreduce_2rank_min_s": {dt: {str(s): v for s, v in m.items()} for dt, m in minima.items()},
        "allreduce_rounds": args.rounds,
        "lora": kind_record("lora"), "full": kind_record("full"),
        "network_assumed": NETWORK, "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0], "end_to_end": end_to_end, "threads": THREADS, "repeats": args.repeats,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
