"""RoSA benchmarks: SDDMM against the dense product, and a RoSA training step against LoRA's.

Part 1. The gradient of the sparse values, dS = (dYᵀX) read on the support, at d_out = d_in = 1024,
N = 1024 tokens, float32, densities 0.1% .. 30%, on two kinds of support:
  - gradient-chosen: top-k of mean(G²) over 4 batches, G = dYᵀX, with per-feature scales drawn
    log-normal (σ = 1) for X and dY, as activations and gradients of trained transformers have;
    such supports cluster in rows and columns (what RoSA actually trains);
  - uniformly random (no structure: the worst case for the planned SDDMM).
Each density is timed for the dense product then the read on the support (the peer), the planned
SDDMM (RosaLinear's default: dense, blocked or gathered, whichever its cost model says is cheapest;
the chosen path is printed), the blocked and the gathered paths forced, and the canonical gather
(at <= 1 %). The crossover is where a method's speedup falls through 1 (log-density interpolation);
``min_speedup_over_densities`` is the planned SDDMM's smallest speedup over both kinds and every
density (target >= 1: it never loses to the dense product).

Part 2. The benchmark model of PERFORMANCE.md (GPT-2 shape, 4 layers, d_model 256, 4 heads, T 128,
batch 8, vocab 512; targets c_attn, c_proj, c_fc; float32; AdamW lr 1e-3), one training step
(forward, backward, controller hooks, AdamW, zero_grad) of RoSA r = 8, d = 1% (support chosen from
one collected batch, then trained) against LoRA r = 8, alternating the two, medians.

Prints tables, then ONE JSON line. Run: python benchmarks/rosa.py [--quick] [--skip-model] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# BLAS threads must be fixed before NumPy loads: --threads N (default 2, the CI machine's cores)
_THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv[:-1] else "2"
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _THREADS

import numpy as np  # noqa: E402
import _common  # noqa: E402  (benchmarks/_common.py, beside this script)
from _common import benchmark_batches, benchmark_model_config  # noqa: E402

from spectral_peft.budget import topk_mask  # noqa: E402
from spectral_peft.sparse import CSR, SddmmPlan, sddmm, sddmm_dense, sddmm_planned  # noqa: E402


MINIMA: dict = {}  # (support kind, density, method) -> best-of-repeats ms, reported beside the medians


def interleaved_ms(fns: dict, repeats: int, key=None) -> dict:
    """Medians (ms) by the shared rule (_common.py); the minima go to MINIMA[key + (name,)]."""
    medians, minima = _common.interleaved_ms(fns, repeats)
    if key is not None:
        for k, v in minima.items():
            MINIMA[key + (k,)] = v
    return medians


def gradient_chosen_mask(rng, d: int, N: int, density: float, batches: int = 4, sigma: float = 1.0):
    sx = np.exp(sigma * rng.standard_normal(d))
    sy = np.exp(sigma * rng.standard_normal(d))
    acc = np.zeros((d, d))
    for _ in range(batches):
        x = rng.standard_normal((N, d)) * sx
        dy = rng.standard_normal((N, d)) * sy
        G = dy.T @ x
        acc += G * G
    return topk_mask(acc / batches, int(density * d * d)), sx, sy


def crossover(densities, speedups) -> float | None:
    """Density where speedup crosses 1, interpolated in log-density; None when it never does."""
    for (d0, s0), (d1, s1) in zip(zip(densities, speedups), zip(densities[1:], speedups[1:])):
        if s0 >= 1.0 > s1:
            t = (math.log(s0)) / (math.log(s0) - math.log(s1))
            return float(math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0))))
    return None if speedups[-1] >= 1.0 else float(densities[0])


def part1(repeats: int, densities) -> dict:
    d, N = 1024, 1024
    rng = np.random.default_rng(0)
    results = {}
    print(f"SDDMM, d_out = d_in = {d}, N = {N}, float32, median of {repeats} (ms; x = dense / method)")
    print(f"{'support':>9} {'density':>8} {'nnz':>7} {'path':>8} {'dense':>7} {'planned':>8} {'x':>6} {'blocked':>8} {'x':>6}"
          f" {'gather':>7} {'x':>6} {'canon':>7} {'x':>6} {'covered':>8}")
    for kind in ("gradient", "random"):
        rows = []
        for density in densities:
            if kind == "gradient":
                mask, sx, sy = gradient_chosen_mask(rng, d, N, density)
            else:
                k = int(density * d * d)
                flat = np.zeros(d * d, dtype=bool)
                flat[rng.choice(d * d, k, replace=False)] = True
                mask, sx, sy = flat.reshape(d, d), np.ones(d), np.ones(d)
            S = CSR.from_mask(mask, dtype=np.float32)
            x = (rng.standard_normal((N, d)) * sx).astype(np.float32)
            dy = (rng.standard_normal((N, d)) * sy).astype(np.float32)
            plan = SddmmPlan(S)  # RosaLinear's default: the path chosen by the cost model
            blocked, gathered = SddmmPlan(S, path="blocked"), SddmmPlan(S, path="gather")
            ref = sddmm_dense(dy, x, S)
            scale = float(np.abs(ref).max())
            for name, got in (("planned", sddmm_planned(dy, x, S, plan)), ("blocked", sddmm_planned(dy, x, S, blocked)),
                              ("gather", sddmm_planned(dy, x, S, gathered)), ("canonical", sddmm(dy, x, S))):
                err = float(np.abs(got - ref).max()) / scale
                assert err < 1e-4, f"{name} differs from the dense product: rel err {err:.2e}"
            fns = {"dense": lambda: sddmm_dense(dy, x, S), "planned": lambda: sddmm_planned(dy, x, S, plan),
                   "blocked": lambda: sddmm_planned(dy, x, S, blocked)}
            if density <= 0.05:  # the forced gathers are slow above a few percent: not timed there
                fns["gather"] = lambda: sddmm_planned(dy, x, S, gathered)
            if density <= 0.01:
                fns["canonical"] = lambda: sddmm(dy, x, S)
            ms = interleaved_ms(fns, repeats, key=(kind, density))
            t = {name: ms.get(name, float("nan")) for name in ("dense", "planned", "blocked", "gather", "canonical")}
            row = dict(density=density, nnz=S.nnz, path=plan.path, covered=plan.covered,
                       **{f"{name}_ms": v for name, v in t.items()},
                       **{f"{name}_x": t["dense"] / v for name, v in t.items() if name != "dense"})
            rows.append(row)
            print(f"{kind:>9} {100 * density:7.2f}% {S.nnz:7d} {plan.path:>8} {t['dense']:7.2f} {t['planned']:8.2f}"
                  f" {row['planned_x']:6.2f} {t['blocked']:8.2f} {row['blocked_x']:6.2f} {t['gather']:7.2f}"
                  f" {row['gather_x']:6.2f} {t['canonical']:7.2f} {row['canonical_x']:6.2f} {100 * plan.covered:7.1f}%")
        results[kind] = rows
    return results


def part2(repeats: int) -> dict:
    try:
        from spectral_peft.backend import get_backend  # noqa: PLC0415
        from spectral_peft.model import GPT2LMHeadModel  # noqa: PLC0415
        from spectral_peft.optim import AdamW  # noqa: PLC0415
    except ImportError as exc:
        print(f"part 2 skipped: the GPT-2 model or AdamW is not available ({exc})")
        return {}
    from spectral_peft.adapters.peft_model import get_peft_model  # noqa: PLC0415
    from spectral_peft.adapters.rosa import RosaConfig  # noqa: PLC0415

    try:
        from spectral_peft.adapters.lora import LoraConfig  # noqa: PLC0415

        def lora_config():
            return LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
        lora_kind = "adapters.lora.LoraConfig"
    except ImportError:  # the same low-rank branch through RoSA with d = 0
        def lora_config():
            return RosaConfig(r=8, d=0.0, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                              schedule="lora_only")
        lora_kind = "RosaConfig(d=0, 'lora_only')"

    be = get_backend("cpu", "float32")
    cfg = benchmark_model_config()
    batches = benchmark_batches()

    def build(config):
        model = GPT2LMHeadModel(cfg, be, seed=0)
        peft = get_peft_model(model, config, seed=0)
        opt = AdamW(peft, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        return peft, opt

    def step(peft, opt, i):
        ids = be.asarray(batches[i % len(batches)])
        for c in peft.controllers:
            c.before_forward(i)
        out = peft.forward(ids, labels=ids)
        peft.backward()
        for c in peft.controllers:
            c.after_backward(i)
        opt.step()
        for c in peft.controllers:
            c.after_optimizer_step(i)
        peft.zero_grad()
        return float(out.loss)

    rosa_cfg = RosaConfig(r=8, d=0.01, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], schedule="wl0",
                          spa_num_grads=1)
    rosa, rosa_opt = build(rosa_cfg)
    lora, lora_opt = build(lora_config())
    step(rosa, rosa_opt, 0)  # collects one batch and chooses the supports
    assert rosa.controllers[0].activated
    trainable = {"rosa": rosa.num_parameters(trainable_only=True), "lora": lora.num_parameters(trainable_only=True)}
    counters = {"rosa": 1, "lora": 0}
    t = {"rosa": [], "lora": []}
    for name, (p, o) in (("rosa", (rosa, rosa_opt)), ("lora", (lora, lora_opt))):  # warm-up
        step(p, o, counters[name])
        counters[name] += 1
    for _ in range(repeats):
        for name, (p, o) in (("rosa", (rosa, rosa_opt)), ("lora", (lora, lora_opt))):
            t0 = time.perf_counter()
            step(p, o, counters[name])
            t[name].append(time.perf_counter() - t0)
            counters[name] += 1
    rosa_ms, lora_ms = 1e3 * float(np.median(t["rosa"])), 1e3 * float(np.median(t["lora"]))
    from spectral_peft.sparse import plan_for  # noqa: PLC0415
    from spectral_peft.adapters.rosa import RosaLinear  # noqa: PLC0415

    covered = [plan_for(m.spa).covered for _, m in rosa.adapter_layers() if isinstance(m, RosaLinear) and m.spa]
    print(f"\nGPT-2 shape (4 layers, d 256, T 128, batch 8), float32, AdamW, median of {repeats} steps:")
    print(f"  RoSA r=8 d=1%: {rosa_ms:7.1f} ms/step  ({trainable['rosa']:,} trainable)")
    print(f"  LoRA r=8     : {lora_ms:7.1f} ms/step  ({trainable['lora']:,} trainable; {lora_kind})")
    print(f"  ratio        : {rosa_ms / lora_ms:.3f}   (SDDMM plan covers {100 * np.mean(covered):.0f}% of entries "
          f"with dense blocks on average)")
    best = min(t["rosa"]) / min(t["lora"])
    print(f"  best-of ratio: {best:.3f}")
    return dict(rosa_ms=rosa_ms, lora_ms=lora_ms, ratio=rosa_ms / lora_ms, ratio_best_of=best,
                rosa_trainable=trainable["rosa"],
                lora_trainable=trainable["lora"], lora_impl=lora_kind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and densities")
    ap.add_argument("--skip-model", action="store_true", help="part 1 only")
    ap.add_argument("--threads", type=int, default=2, help="BLAS threads (default 2)")
    args = ap.parse_args(argv)
    repeats = 5 if args.quick else 15
    densities = [0.001, 0.01, 0.1, 0.3] if args.quick else [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3]
    p1 = part1(repeats, densities)
    p2 = {} if args.skip_model else part2(5 if args.quick else 15)

    def at(kind, key, density=0.01):
        rows = [r for r in p1[kind] if abs(r["density"] - density) < 1e-12]
        return round(rows[0][key], 3) if rows else None

    dens = [r["density"] for r in p1["gradient"]]
    planned_x = [r["planned_x"] for kind in ("gradient", "random") for r in p1[kind]]
    result = {
        "benchmark": "rosa",
        "blas_threads": int(_THREADS),
        "sddmm_speedup_at_1pct": at("gradient", "planned_x"),
        "sddmm_speedup_at_1pct_random": at("random", "planned_x"),
        "min_speedup_over_densities": round(min(planned_x), 3),
        # the same from best-of-repeats times: where the plan takes the dense path too, planned and
        # dense run the same BLAS call and their medians differ by the machine's noise alone
        "min_speedup_over_densities_best_of": round(min(MINIMA[(kind, r["density"], "dense")]
                                                        / MINIMA[(kind, r["density"], "planned")]
                                                        for kind in ("gradient", "random") for r in p1[kind]), 3),
        "planned_speedup_by_density": {kind: {str(r["density"]): round(r["planned_x"], 3) for r in p1[kind]}
                                       for kind in ("gradient", "random")},
        "planned_path_by_density": {kind: {str(r["density"]): r["path"] for r in p1[kind]}
                                    for kind in ("gradient", "random")},
        "sddmm_gather_speedup_at_1pct_random": at("random", "gather_x"),
        "sddmm_blocked_speedup_at_1pct": at("gradient", "blocked_x"),
        "crossover_density": crossover(dens, [r["planned_x"] for r in p1["gradient"]]),
        "crossover_density_random": crossover(dens, [r["planned_x"] for r in p1["random"]]),
        "densities_tested": [min(dens), max(dens)],  # a null crossover: faster over the whole range
        "sddmm_speedup_at_1pct_best_of": (round(MINIMA[("gradient", 0.01, "dense")] / MINIMA[("gradient", 0.01, "planned")], 3)
                                          if ("gradient", 0.01, "planned") in MINIMA else None),
        "sddmm_speedup_at_1pct_random_best_of": (round(MINIMA[("random", 0.01, "dense")] / MINIMA[("random", 0.01, "planned")], 3)
                                                 if ("random", 0.01, "planned") in MINIMA else None),
        "dense_ms_at_1pct": at("gradient", "dense_ms"),
        "planned_ms_at_1pct": at("gradient", "planned_ms"),
        "rosa_ms": round(p2["rosa_ms"], 2) if p2 else None,
        "lora_ms": round(p2["lora_ms"], 2) if p2 else None,
        "ratio": round(p2["ratio"], 3) if p2 else None,
        "ratio_best_of": round(p2["ratio_best_of"], 3) if p2 else None,
        "targets": {"sddmm_speedup_at_1pct": ">= 3", "sddmm_speedup_at_1pct_random": ">= 1.0",
                    "min_speedup_over_densities": ">= 1.0", "ratio": "<= 1.25"},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
