"""Exact resume: N steps, a checkpoint, a kill (SIGKILL, during steps or inside a checkpoint
write), then resuming to N + M gives bitwise the parameters, optimiser state, controller state and
losses of N + M uninterrupted steps, in float32 and float64, for every method present.

The uninterrupted reference runs in this process; the interrupted runs are subprocesses of
tests/_train_worker.py, killed at points drawn from a seeded generator. Bitwise equality is
asserted on the losses (float.hex) and on the final checkpoint's files, byte for byte: those hold
every parameter, the optimiser, schedule, controllers (AdaLoRA's EMAs and masks mid-schedule,
RoSA's gradient sums mid-collection and its supports), the dropout generators and the data position.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_peft.io.checkpoint import latest_checkpoint, list_checkpoints

sys.path.insert(0, os.path.dirname(__file__))
import _train_worker as W  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_train_worker.py")
FILES = ("model.safetensors", "state.safetensors", "state.json")
METHODS = [m for m, mod in (("full", None), ("adalora", "spectral_peft.adapters.adalora"),
                            ("rosa", "spectral_peft.adapters.rosa"), ("lora", "spectral_peft.adapters.lora"),
                            ("dylora", "spectral_peft.adapters.dylora"), ("qlora", "spectral_peft.quant"),
                            ("dora", "spectral_peft.adapters.dora"), ("lorafa", "spectral_peft.adapters.lorafa"),
                            ("deltalora", "spectral_peft.adapters.deltalora"))
           if mod is None or importlib.util.find_spec(mod) is not None]
_REFS: dict = {}


def reference(method: str, dtype: str, root) -> tuple[list[str], str]:
    """(losses as hex, path of the final checkpoint) of TOTAL uninterrupted steps, computed once."""
    key = (method, dtype)
    if key not in _REFS:
        d = os.path.join(root, f"ref-{method}-{dtype}")
        trainer, batches = W.build(method, dtype, checkpoint_dir=d, every=2)
        losses = [float(m["loss"]).hex() for m in trainer.fit(batches, W.TOTAL)]
        _REFS[key] = (losses, latest_checkpoint(d))
    return _REFS[key]


@pytest.fixture(scope="module")
def refroot(tmp_path_factory):
    return str(tmp_path_factory.mktemp("refs"))


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def assert_same_checkpoint(actual_dir, expected_dir):
    assert os.path.basename(actual_dir) == os.path.basename(expected_dir)
    for name in FILES:
        a, e = read_bytes(os.path.join(actual_dir, name)), read_bytes(os.path.join(expected_dir, name))
        assert a == e, f"{name} of {actual_dir} differs from the uninterrupted run's ({len(a)} vs {len(e)} bytes)"


def worker(args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


def finish(d, method, dtype) -> list[str]:
    """Run the worker to the end (resuming from d); return the 'step' lines' losses by step."""
    p = worker(["--dir", d, "--method", method, "--dtype", dtype, "--steps", str(W.TOTAL)])
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, f"resumed worker failed:\n{err[-3000:]}"
    lines = out.split()
    assert lines[0] == "resumed"
    return {int(s): h for tag, s, h in zip(lines[2::3], lines[3::3], lines[4::3]) if tag == "step"}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", METHODS)
def test_resume_in_process_is_bitwise(method, dtype, refroot, tmp_path):
    """fit(5) -> fresh objects -> resume() -> fit(TOTAL) equals TOTAL uninterrupted steps."""
    ref_losses, ref_final = reference(method, dtype, refroot)
    split = 4 if method == "rosa" else 5  # RoSA: 2 of its 3 collection steps done
    d = str(tmp_path / "ck")
    trainer, batches = W.build(method, dtype, checkpoint_dir=d, every=2)
    first = [float(m["loss"]).hex() for m in trainer.fit(batches, split)]
    assert [s for s, _ in list_checkpoints(d)] == sorted({2, 4, split})
    trainer2, batches2 = W.build(method, dtype, checkpoint_dir=d, every=2)
    assert trainer2.resume() == split
    if method == "rosa":  # resumed in mid-collection
        ctl = trainer2.controllers[0]
        assert not ctl.activated and all(layer.grad_count == 2 for _, layer in ctl.sparse_layers())
    if method == "adalora":  # resumed in mid-schedule: masks applied, EMAs live, pattern not yet final
        alloc = trainer2.controllers[0].allocator
        assert alloc.frozen_pattern is None and alloc.exp_avg_ipt
        assert any(not all(m.pattern) for _, m in alloc.layers if m.pattern is not None)
    rest = [float(m["loss"]).hex() for m in trainer2.fit(batches2, W.TOTAL)]
    assert first + rest == ref_losses
    assert_same_checkpoint(latest_checkpoint(d), ref_final)


@given(method=st.sampled_from([m for m in METHODS if m != "qlora"]), split=st.integers(1, W.TOTAL - 1),
       every=st.integers(1, 4), dtype=st.sampled_from(["float64", "float32"]))
@settings(deadline=None)
def test_resume_at_any_step_is_bitwise(refroot, tmp_path_factory, method, split, every, dtype):
    """Hypothesis draws the method, the step the run stops at and the checkpoint interval; the
    run resumes from the newest checkpoint (possibly earlier than the stop) and must match."""
    ref_losses, ref_final = reference(method, dtype, refroot)
    d = str(tmp_path_factory.mktemp("any"))
    trainer, batches = W.build(method, dtype, checkpoint_dir=d, every=every)
    first = [float(m["loss"]).hex() for m in trainer.fit(batches, split)]
    assert first == ref_losses[:split]
    os.rename(os.path.join(d, f"step-{split:08d}"), os.path.join(d, f".trash-step-{split:08d}-0"))  # lose the end
    trainer2, batches2 = W.build(method, dtype, checkpoint_dir=d, every=2)
    start = trainer2.resume()
    assert start == max([s for s in range(every, split, every)], default=0)
    rest = [float(m["loss"]).hex() for m in trainer2.fit(batches2, W.TOTAL)]
    assert rest == ref_losses[start:]
    assert_same_checkpoint(latest_checkpoint(d), ref_final)


def test_resumed_state_differs_from_fresh_state(refroot, tmp_path):
    """The byte comparison can fail: a run restarted from scratch at step 5 (same data position,
    nothing restored) ends in different files."""
    method = "adalora" if "adalora" in METHODS else "full"
    _, ref_final = reference(method, "float64", refroot)
    d = str(tmp_path / "ck")
    trainer, batches = W.build(method, "float64", checkpoint_dir=d, every=2)
    trainer.step = 5  # skip the restore: the weights, optimiser and generators are fresh
    trainer.fit(batches, W.TOTAL)
    a = read_bytes(os.path.join(latest_checkpoint(d), "model.safetensors"))
    assert a != read_bytes(os.path.join(ref_final, "model.safetensors"))


# (method, dtype, seed of the kill point); float64 for every method but QLoRA (its quantisation
# costs seconds per process; its resume is checked in process above), float32 for two.
KILL_CASES = [(m, "float64", i) for i, m in enumerate(METHODS) if m in ("full", "adalora", "rosa", "lora", "dylora",
                                                                       "deltalora")] + \
             [(m, "float32", 10 + i) for i, m in enumerate(METHODS[:2])]


@pytest.mark.parametrize("method,dtype,seed", KILL_CASES)
def test_sigkill_during_training_then_resume_is_bitwise(method, dtype, seed, refroot, tmp_path):
    ref_losses, ref_final = reference(method, dtype, refroot)
    rng = np.random.default_rng(seed)
    kill_after = int(rng.integers(1, W.TOTAL - 2))  # a random step, at least 3 before the end
    delay = float(rng.uniform(0.0, 0.02))  # then a random moment: in a step, a write, or between steps
    d = str(tmp_path / "ck")
    # The worker pauses 20 ms after each step so that this process keeps pace with it.
    p = worker(["--dir", d, "--method", method, "--dtype", dtype, "--steps", str(W.TOTAL), "--step-sleep", "0.02"])
    for line in p.stdout:
        if line.startswith("step") and int(line.split()[1]) >= kill_after:
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the worker ended before it could be killed"
    steps = [s for s, _ in list_checkpoints(d)]  # none when killed before step 2's checkpoint
    assert max(steps, default=0) <= W.TOTAL - 1
    resumed = finish(d, method, dtype)
    start = min(resumed) - 1
    assert start == max(steps, default=0)
    assert [resumed[s] for s in sorted(resumed)] == ref_losses[start:]
    assert_same_checkpoint(latest_checkpoint(d), ref_final)


@pytest.mark.parametrize("pause_in", ["model.safetensors", "state.json"])
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(pause_in, refroot, tmp_path):
    """Killed after writing ``pause_in`` into the temporary directory of step 6's checkpoint:
    step 4's checkpoint is the newest complete one and intact, and resuming from it is bitwise."""
    method = "lora" if "lora" in METHODS else "full"
    ref_losses, ref_final = reference(method, "float64", refroot)
    d = str(tmp_path / "ck")
    p = worker(["--dir", d, "--method", method, "--dtype", "float64", "--steps", str(W.TOTAL),
                "--pause", f"6:{pause_in}"])
    for line in p.stdout:
        if line.strip() == "PAUSED":
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    leftovers = [n for n in os.listdir(d) if n.startswith(".tmp-step-00000006")]
    assert len(leftovers) == 1 and pause_in in os.listdir(os.path.join(d, leftovers[0]))
    assert [s for s, _ in list_checkpoints(d)] == [2, 4]
    resumed = finish(d, method, "float64")
    assert min(resumed) == 5
    assert [resumed[s] for s in sorted(resumed)] == ref_losses[4:]
    assert not [n for n in os.listdir(d) if n.startswith(".")], "the partial write was not cleaned up"
    assert_same_checkpoint(latest_checkpoint(d), ref_final)
