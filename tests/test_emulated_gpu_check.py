"""benchmarks/gpu_check.sh: its syntax, and its CPU-side parts on the gpu-emulated device (the
kernel-vs-twin check and the step benchmark against torch on the CPU), down to its JSON summary."""
import json
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

pytest.importorskip("cupy")
bash = shutil.which("bash")
pytestmark = pytest.mark.skipif(bash is None, reason="bash is not installed")


def test_gpu_check_script_parses():
    res = subprocess.run([bash, "-n", SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_gpu_check_cpu_side_parts_write_one_json_summary(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "summary.json"
    env = dict(os.environ, GPU_CHECK_DEVICE="gpu-emulated", GPU_CHECK_TORCH_DEVICE="cpu",
               GPU_CHECK_PARTS="kernels,step", GPU_CHECK_STEP_REPEATS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([bash, SCRIPT, str(out)], capture_output=True, text=True, env=env, timeout=300,
                         executable=bash)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads(out.read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == summary
    assert summary["ok"] and summary["device"] == "gpu-emulated"
    assert summary["parts"]["suite"]["status"] == "skipped"
    kernels = summary["parts"]["kernels"]["result"]["kernels"]
    assert kernels and all(k["bit_identical"] for k in kernels.values())
    step = summary["parts"]["step"]["result"]
    assert step["engine_ms"] > 0 and step["torch_ms"] > 0
    assert abs(step["loss_engine"] - step["loss_torch"]) < 1e-4 * abs(step["loss_torch"])
    assert step["h2d_per_step"] == 2 and step["d2h_per_step"] > 0, step  # the batch in; named reads out
