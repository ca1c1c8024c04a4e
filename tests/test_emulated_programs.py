"""The whole programs on the gpu-emulated device: the CPU's results, and the transfers per step.

``spectral-peft run --quick`` and ``reference`` on ``gpu-emulated`` give the CPU's numbers
(float64, within 1e-12 relative: the emulation computes with NumPy, but CuPy's paths may order
a sum differently, e.g. cupyx.scatter_add for the embedding gradient). Every training step after
the first makes only these transfers (docs/gpu.md):

- host-to-device: the batch (input_ids and labels: 2), and RoSA's support when it is rebuilt;
- device-to-host, each named: 5 input checks (token ids in the model and in the token embedding,
  position ids in the position embedding, labels in the model and in the loss), 2 loss reads (its
  token count and its sum), 1 NaN guard for all gradients, 1 clipping norm: 9. AdaLoRA adds two orthogonality norms per adapted layer
  and its budget's reads (rank masks, one per layer, and the score check); a RoSA step that builds
  its support reads, per adapted layer, the score check, the mask and the CSR index arrays back.

With SPECTRAL_PEFT_TRANSFER_GUARD=error every method but AdaLoRA runs: their syncs are all named
or explicit (AdaLoRA's orthogonality penalty reads its norms with float()).
"""
import glob
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from spectral_peft import cli
from spectral_peft.emulated import ENV_GUARD
from spectral_peft.testing import assert_close

pytest.importorskip("cupy")
QUICK = ["run", "--quick", "--dtype", "float64", "--figures", "false", "--progress", "false"]
# fields that differ by nature between two runs: wall times, paths, the device named
_VOLATILE = {"created", "timing", "ms_per_step", "seconds", "seconds_this_run", "cache_path", "cached", "out",
             "cache_dir", "device", "figures", "d2h", "h2d"}
BATCH_ARRAYS = 2  # input_ids, labels
NAMED_SYNCS = 5 + 2 + 1 + 1  # input checks, loss, NaN guard, clipping


def _results(folder) -> dict:
    (path,) = glob.glob(os.path.join(folder, "2*", "results.json"))
    with open(path) as f:
        return json.load(f)


def _run(root, device, *extra) -> dict:
    out = os.path.join(root, device)
    code = cli.main([*QUICK, "--device", device, "--cache_dir", os.path.join(root, f"cache-{device}"),
                     "--out", out, *extra])
    assert code == 0, f"run --device {device} exited {code}"
    return _results(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("emulated_runs"))
    return {d: _run(root, d) for d in ("cpu", "gpu-emulated")}


def _compare(cpu, emu, where: str):
    if isinstance(cpu, dict):
        assert set(cpu) == set(emu), f"{where}: keys differ: {sorted(set(cpu) ^ set(emu))}"
        for k in cpu:
            if k not in _VOLATILE:
                _compare(cpu[k], emu[k], f"{where}.{k}")
    elif isinstance(cpu, list):
        assert len(cpu) == len(emu), f"{where}: lengths {len(cpu)} and {len(emu)}"
        if cpu and all(isinstance(v, float) for v in cpu):
            assert_close(np.array(emu), np.array(cpu), rtol=1e-12, atol=0.0, name=where)
        else:
            for i, (a, b) in enumerate(zip(cpu, emu)):
                _compare(a, b, f"{where}[{i}]")
    elif isinstance(cpu, float):
        assert_close(np.float64(emu), np.float64(cpu), rtol=1e-12, atol=0.0, name=where)
    else:
        assert cpu == emu, f"{where}: {cpu!r} on the CPU, {emu!r} on gpu-emulated"


def test_run_quick_on_gpu_emulated_gives_the_cpus_results(runs):
    assert runs["gpu-emulated"]["config"]["device"] == "gpu-emulated"
    assert [m["method"] for m in runs["cpu"]["methods"]] == [m["method"] for m in runs["gpu-emulated"]["methods"]]
    _compare(runs["cpu"], runs["gpu-emulated"], "results")


def test_transfers_per_step_are_bounded_for_every_method(runs):
    cfg = runs["gpu-emulated"]["config"]
    layers = cfg["n_layer"] * 4  # adapted linears: c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    extra = {"adalora": 2 * layers + layers + 1}  # orthogonality norms, rank masks, score check
    assert len(runs["gpu-emulated"]["methods"]) == 11
    for m in runs["gpu-emulated"]["methods"]:
        name, curve = m["method"], m["train_curve"]
        assert len(curve["d2h"]) == len(curve["step"]) == cfg["steps"], name
        later = list(zip(curve["step"], curve["d2h"], curve["h2d"]))[1:]  # the first step may set up
        support_steps = [s for s, _, h in later if h > BATCH_ARRAYS]
        if name in ("rosa", "qrosa"):  # the support is built on the host once its gradients are in
            assert len(support_steps) <= cfg["spa_num_grads"], (name, support_steps)
        else:
            assert support_steps == [], f"{name}: host-to-device copies beyond the batch at steps {support_steps}"
        for step, d2h, h2d in later:
            assert h2d >= BATCH_ARRAYS, f"{name} step {step}: the batch was not copied ({h2d})"
            bound = NAMED_SYNCS + extra.get(name, 0)
            if step in support_steps:  # per adapted layer: the score check, mask, indptr, indices reads
                bound += 6 * layers
            assert d2h <= bound, f"{name} step {step}: {d2h} device-to-host syncs, more than {bound}"
    cpu_counts = {m["method"]: m["train_curve"]["d2h"] + m["train_curve"]["h2d"] for m in runs["cpu"]["methods"]}
    assert all(v == 0 for counts in cpu_counts.values() for v in counts)  # the CPU moves nothing


def test_transfer_guard_passes_every_method_but_adalora(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_GUARD, "error")
    methods = "full,lora,rslora,dora,dylora,lorafa,deltalora,rosa,qlora,qrosa"
    res = _run(str(tmp_path), "gpu-emulated", "--methods", methods, "--steps", "3")
    assert [m["method"] for m in res["methods"]] == methods.split(",")


def test_run_gpu_without_a_gpu_says_why_and_writes_nothing(tmp_path, capsys):
    from spectral_peft.backend import gpu_unavailable_reason

    if gpu_unavailable_reason() is None:
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    assert cli.main([*QUICK, "--device", "gpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and gpu_unavailable_reason() in err[0] and "gpu-emulated" in err[0], err
    assert not out.exists()


def test_reference_on_gpu_emulated_gives_the_cpus_outputs(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    model_dir = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=19, n_positions=8, n_embd=8, n_layer=2,
                                                         n_head=2)).save_pretrained(str(model_dir))
    ids = np.array([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 0, 0]], dtype=np.int64)
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], dtype=np.int64)
    save_file({"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)},
              str(tmp_path / "in.safetensors"))
    outs = {}
    for device in ("cpu", "gpu-emulated"):
        monkeypatch.setenv("SPECTRAL_PEFT_DEVICE", device)
        out = tmp_path / f"{device}.safetensors"
        code = cli.main(["reference", "--model", str(model_dir), "--inputs", str(tmp_path / "in.safetensors"),
                         "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        outs[device] = load_file(str(out))
    assert set(outs["cpu"]) == set(outs["gpu-emulated"]) and "loss" in outs["cpu"]
    for k, v in outs["cpu"].items():
        assert_close(outs["gpu-emulated"][k], v, rtol=1e-12, atol=1e-300, name=k)
