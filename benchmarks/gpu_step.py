"""One LoRA training step on a GPU: the engine (CuPy float32) against transformers + PEFT (torch CUDA).

The model, adapter, optimiser and batch of benchmarks/lora.py (GPT-2 shape, 4 layers, d_model 256,
T 128, batch 8, LoRA r 8 on c_attn, c_proj, c_fc; AdamW), with the engine on ``--device`` and
torch on ``--torch-device``. Each timed call ends with a device synchronisation on its side
(cupy's deviceSynchronize, torch.cuda.synchronize), so the medians are whole steps. Also reported:
the engine's device-to-host syncs and host-to-device copies per step (the backend's ledger).

``--device gpu-emulated --torch-device cpu`` runs the same script on a machine without a GPU (a
check of the script, not a benchmark).

The last line is ONE JSON object: device, engine_ms, torch_ms, ratio, losses, d2h_per_step,
h2d_per_step.

Run: python benchmarks/gpu_step.py [--device gpu] [--torch-device cuda] [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import sys

from _common import benchmark_batches, interleaved_ms  # noqa: E402  (beside this script)
from _common import engine_step, torch_step  # noqa: E402
from lora import make_pair  # noqa: E402

from spectral_peft.backend import begin_step, end_step


def _sync_engine(device: str):
    if device != "gpu":
        return lambda: None
    import cupy  # noqa: PLC0415 - only on a real GPU

    return cupy.cuda.runtime.deviceSynchronize


def _sync_torch(torch_device: str):
    import torch  # noqa: PLC0415

    return torch.cuda.synchronize if torch_device.startswith("cuda") else (lambda: None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="gpu", choices=("gpu", "gpu-emulated"))
    p.add_argument("--torch-device", default="cuda")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    import torch  # noqa: PLC0415

    pm, opt, pm_t, topt = make_pair(0, args.device, args.torch_device)
    (ids,) = benchmark_batches(1)
    ids_t = torch.tensor(ids, device=args.torch_device)
    sync_e, sync_t = _sync_engine(args.device), _sync_torch(args.torch_device)
    loss_e, loss_t = engine_step(pm, opt, ids), torch_step(pm_t, topt, ids_t)
    before = begin_step(0)
    engine_step(pm, opt, ids)
    moved = end_step(before)

    def engine():
        engine_step(pm, opt, ids)
        sync_e()

    def peer():
        torch_step(pm_t, topt, ids_t)
        sync_t()

    ms, _ = interleaved_ms({"engine": engine, "torch": peer}, args.repeats, warmup=1)
    print(json.dumps({"benchmark": "gpu_step", "device": args.device, "torch_device": args.torch_device,
                      "engine_ms": round(ms["engine"], 3), "torch_ms": round(ms["torch"], 3),
                      "ratio": round(ms["engine"] / ms["torch"], 3), "loss_engine": loss_e, "loss_torch": loss_t,
                      "d2h_per_step": moved["d2h"], "h2d_per_step": moved["h2d"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
