"""One full fine-tuning step of GPT-2: the engine (NumPy float32) against transformers (torch CPU).

The benchmark model: GPT-2 shape, 4 layers, d_model 256, 4 heads,
T 128, batch 8, vocab 512; full fine-tuning with AdamW (lr 1e-4, weight decay 0.01); dropout off;
both on 2 threads (OPENBLAS_NUM_THREADS / torch.set_num_threads). The same weights (the engine's
model saved with save_pretrained and loaded by transformers) and the same batch.

step = forward with labels (loss), backward, AdamW step, zero_grad. The two are timed in turn in
every repeat, so load from other processes falls on both alike; medians after warm-up.

Also reported:
- model FLOP/s of the engine as a fraction of NumPy's float32 GEMM rate, measured in this run on
  the step's own GEMM shapes (every linear's forward, dX and dW product, and the tied head), the
  engine step and the GEMM pass interleaved in one loop (engine alone, without torch in the loop);
  model FLOPs per step = 3 × forward, forward = L (24 N C² + 4 B T² C) + 2 N C V, N = B·T;
- a width sweep, d_model 128 .. 1024 (head width 64), engine and torch.
The last line is ONE JSON object: engine_ms, torch_ms, ratio, gemm_fraction, losses and the sweep.

--profile prints the per-op-kind breakdown of the engine's step (benchmarks/_profile.py) first.

Run: python benchmarks/step.py [--repeats N] [--sweep-repeats N] [--no-sweep] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import numpy as np  # noqa: E402
from _common import KEEP_FREED_MEMORY, OMP_WAIT_POLICY, engine_step, interleaved_ms, time_pair  # noqa: E402  (benchmarks/_common.py, beside this script)
from _profile import profile_steps  # noqa: E402  (benchmarks/_profile.py)

from spectral_peft.backend import get_backend  # noqa: E402
from spectral_peft.model import GPT2Config, GPT2LMHeadModel, save_pretrained  # noqa: E402
from spectral_peft.optim import AdamW  # noqa: E402

THREADS = 2
B, T, V, L = 8, 128, 512, 4
LR, WD = 1e-4, 0.01


def make_pair(C: int, H: int, seed: int = 0):
    """(engine model + AdamW, torch model + AdamW) holding the same weights."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg, get_backend("cpu", "float32"), seed=seed)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        tm = transformers.GPT2LMHeadModel.from_pretrained(d, dtype=torch.float32)
    tm.train()  # dropout probabilities are 0: training mode changes nothing but is what users run
    opt = AdamW(model, lr=LR, weight_decay=WD)
    topt = torch.optim.AdamW(tm.parameters(), lr=LR, weight_decay=WD)
    return model, opt, tm, topt


def model_flops(C: int) -> float:
    """Model FLOPs of one training step (3 × forward: the backward does two products per one)."""
    N = B * T
    forward = L * (24 * N * C * C + 4 * B * T * T * C) + 2 * N * C * V
    return 3.0 * forward


def gemm_pass(C: int):
    """(fn, FLOPs): fn runs NumPy float32 GEMMs on the step's linear shapes once (forward, dX, dW
    of each linear and the tied head)."""
    N = B * T
    rng = np.random.default_rng(0)
    shapes = []  # (m, k, n): (m, k) @ (k, n)
    for d_in, d_out in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C), (C, V)):
        shapes += [(N, d_in, d_out), (N, d_out, d_in), (d_out, N, d_in)]
    mats = [(rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32))
            for m, k, n in shapes]

    def run():
        for a, b in mats:
            a @ b

    return run, sum(2.0 * m * k * n for m, k, n in shapes)


def gemm_rate(C: int, repeats: int) -> float:
    """NumPy float32 GEMM FLOP/s on the step's linear shapes, timed alone (the width sweep)."""
    run, flops = gemm_pass(C)
    ms, _ = interleaved_ms({"gemm": run}, repeats)
    return flops / (ms["gemm"] / 1e3)


def engine_gemm_fraction(model, opt, ids, C: int, repeats: int) -> tuple[float, float, float]:
    """(engine step ms, GEMM FLOP/s, gemm_fraction) from ONE interleaved loop of the engine step and the
    GEMM pass: on a loaded machine a rate timed apart from the step it divides reads anywhere from 0.6x
    to 1.2x of it (measured), so both are taken under the same load."""
    run, flops = gemm_pass(C)
    ms, _ = interleaved_ms({"engine": lambda: engine_step(model, opt, ids), "gemm": run}, repeats)
    rate = flops / (ms["gemm"] / 1e3)
    return ms["engine"], rate, model_flops(C) / (ms["engine"] / 1e3) / rate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--sweep-repeats", type=int, default=3)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the per-op-kind breakdown of the engine step")
    p.add_argument("--profile-steps", type=int, default=7)
    args = p.parse_args(argv)
    import torch  # noqa: PLC0415

    torch.set_num_threads(THREADS)
    ids = np.random.default_rng(1).integers(0, V, (B, T))

    model, opt, tm, topt = make_pair(256, 4)
    ms, _, loss_e, loss_t = time_pair(model, opt, tm, topt, ids, args.repeats)  # first: same weights, same loss
    prof = None
    if args.profile:
        text, prof = profile_steps(model, opt, lambda m=model, o=opt: engine_step(m, o, ids), args.profile_steps, warmup=1,
                                   title=f"profile: full fine-tuning step, d_model 256, median of {args.profile_steps} steps")
        print(text)
    engine_ms, torch_ms = ms["engine"], ms["torch"]
    solo_ms, rate, gemm_fraction = engine_gemm_fraction(model, opt, ids, 256, max(args.repeats, 11))
    flops = model_flops(256)
    engine_rate = flops / (solo_ms / 1e3)
    losses_agree = abs(loss_e - loss_t) <= 1e-4 * abs(loss_t)
    print(f"GPT-2 L={L} C=256 H=4 T={T} B={B} V={V}, full fine-tuning, AdamW, float32, {THREADS} threads")
    print(f"  engine       {engine_ms:8.1f} ms/step   loss {loss_e:.6f}")
    print(f"  transformers {torch_ms:8.1f} ms/step   loss {loss_t:.6f}   (losses agree: {losses_agree})")
    print(f"  ratio engine/transformers {engine_ms / torch_ms:.3f}   (target <= 0.8)")
    print(f"  model FLOPs/step {flops / 1e9:.2f} G; engine {engine_rate / 1e9:.1f} GFLOP/s ({solo_ms:.1f} ms/step, "
          f"interleaved with the GEMM pass); NumPy GEMM {rate / 1e9:.1f} GFLOP/s; fraction {gemm_fraction:.3f}   "
          f"(target >= 0.75)")
    del model, opt, tm, topt

    sweep = []
    if not args.no_sweep:
        print("width sweep (head width 64):")
        print(f"  {'d_model':>7} {'engine ms':>10} {'torch ms':>10} {'ratio':>6} {'gemm frac':>9}")
        for C in (128, 256, 512, 1024):
            m, o, t, to = make_pair(C, C // 64)
            ms_w, _, le, lt = time_pair(m, o, t, to, ids, args.sweep_repeats, warmup=1)
            e_ms, t_ms = ms_w["engine"], ms_w["torch"]
            frac = model_flops(C) / (e_ms / 1e3) / gemm_rate(C, 3)
            sweep.append({"d_model": C, "engine_ms": round(e_ms, 2), "torch_ms": round(t_ms, 2),
                          "ratio": round(e_ms / t_ms, 4), "gemm_fraction": round(frac, 4),
                          "losses_agree": abs(le - lt) <= 1e-4 * abs(lt)})
            print(f"  {C:>7} {e_ms:>10.1f} {t_ms:>10.1f} {e_ms / t_ms:>6.3f} {frac:>9.3f}")
            del m, o, t, to
    print(json.dumps({"benchmark": "step", "engine_ms": round(engine_ms, 2), "torch_ms": round(torch_ms, 2),
                      "ratio": round(engine_ms / torch_ms, 4), "gemm_fraction": round(gemm_fraction, 4),
                      "gemm_gflops": round(rate / 1e9, 1), "engine_gflops": round(engine_rate / 1e9, 1),
                      "engine_solo_ms": round(solo_ms, 2),
                      "loss_engine": loss_e, "loss_torch": loss_t, "losses_agree": bool(losses_agree),
                      "threads": THREADS, "keep_freed_memory": KEEP_FREED_MEMORY, "omp_wait_policy": OMP_WAIT_POLICY, "sweep": sweep, **({"profile": prof} if prof is not None else {})}))
    return 0 if losses_agree else 1


if __name__ == "__main__":
    sys.exit(main())
