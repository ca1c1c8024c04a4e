"""Every CuPy kernel of the engine against its NumPy twin, bit for bit, on each kernel's examples.

The kernels register their twins (spectral_peft.emulated.register_twin) beside their CUDA source;
this script compiles each with the namespace of ``--device`` (``gpu``: the real CuPy, which needs
a GPU; ``gpu-emulated``: the emulated one, which runs the twin itself: a check of this script), runs
it on ``--examples`` seeded draws of its example inputs, and compares the bits of every output
with the twin's on the host.

The last line is ONE JSON object: {"benchmark": "gpu_kernels", "device", "kernels": {name:
{"examples", "bit_identical", "max_ulps"}}, "ok"}.

Run: python benchmarks/gpu_kernels.py [--device gpu|gpu-emulated] [--examples N]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import spectral_peft.quant.kernels  # noqa: F401  (registers the 4-bit dequantisation twin)
from spectral_peft.backend import get_backend, to_device, to_host
from spectral_peft.emulated import TWINS


def check_kernel(name: str, backend, examples: int) -> dict:
    """Run kernel ``name`` and its twin on ``examples`` draws; compare the bits."""
    twin = TWINS[name]
    xp = backend.xp
    kernel = getattr(xp, twin.kind)(**twin.source)
    identical, max_ulps = True, 0
    for seed in range(examples):
        inputs, size = twin.example(np.random.default_rng(seed))
        expected = np.atleast_1d(twin.fn(*inputs, size=size))
        dev = [to_device(np.asarray(a), backend) if isinstance(a, np.ndarray) else a for a in inputs]
        got = to_host(kernel(*dev, size=size))
        same = got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(
            got.view(np.uint8), expected.view(np.uint8))
        identical &= bool(same)
        if not same and got.shape == expected.shape and got.dtype.kind == "f":
            bits = {4: np.int32, 8: np.int64}[got.dtype.itemsize]
            max_ulps = max(max_ulps, int(np.abs(got.view(bits).astype(np.int64) - expected.view(bits)).max()))
    return {"examples": examples, "bit_identical": identical, "max_ulps": max_ulps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="gpu", choices=("gpu", "gpu-emulated"))
    p.add_argument("--examples", type=int, default=5)
    args = p.parse_args(argv)
    try:
        backend = get_backend(args.device, "float32")
    except RuntimeError as exc:
        print(f"gpu_kernels: {exc}", file=sys.stderr)
        return 2
    kernels = {name: check_kernel(name, backend, args.examples) for name in sorted(TWINS) if TWINS[name].source}
    ok = bool(kernels) and all(k["bit_identical"] for k in kernels.values())
    print(json.dumps({"benchmark": "gpu_kernels", "device": args.device, "kernels": kernels, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
