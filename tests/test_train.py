"""The training loop: PEFT's call order, regularisers in the loss, metrics, evaluation,
deterministic data, and bitwise determinism across runs with the same seed."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from spectral_peft.adapters.base import Controller
from spectral_peft.train import SeededBatches, Trainer

sys.path.insert(0, os.path.dirname(__file__))
import _train_worker as W  # noqa: E402


class Recorder(Controller):
    def __init__(self, log, reg=0.0):
        self.log, self.reg = log, reg

    def before_forward(self, step):
        self.log.append(("before_forward", step))

    def regularize(self):
        self.log.append(("regularize",))
        return self.reg

    def after_backward(self, step):
        self.log.append(("after_backward", step))

    def after_optimizer_step(self, step):
        self.log.append(("after_optimizer_step", step))


class Spy:
    """Wraps an object, logging calls of the named methods before delegating."""

    def __init__(self, inner, log, name, methods):
        self._inner, self._log, self._name = inner, log, name
        for m in methods:
            setattr(self, m, self._wrap(m))

    def _wrap(self, m):
        def call(*a, **k):
            self._log.append((f"{self._name}.{m}",))
            return getattr(self._inner, m)(*a, **k)
        return call

    def __getattr__(self, k):
        return getattr(self._inner, k)


class SpySchedule:
    def __init__(self, log):
        self.log, self.n = log, 0

    def step(self):
        self.log.append(("schedule.step",))
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


def test_step_runs_in_peft_order_and_adds_regularisers_to_the_loss():
    log: list = []
    t0, batches = W.build("full", "float64")
    model = Spy(t0.model, log, "model", ["forward", "backward", "zero_grad"])
    opt = Spy(t0.optimizer, log, "optimizer", ["step"])
    tr = Trainer(model, opt, SpySchedule(log), controllers=[Recorder(log, reg=0.25), Recorder(log, reg=0.5)])
    plain, _ = W.build("full", "float64")
    expected_loss = float(plain.model.forward(**batches.batch(0)).loss) + 0.75
    m = tr.train_step(batches.batch(0))
    assert m["loss"] == expected_loss
    assert log == [("before_forward", 0), ("before_forward", 0), ("model.forward",), ("model.backward",),
                   ("regularize",), ("regularize",), ("after_backward", 0), ("after_backward", 0),
                   ("optimizer.step",), ("schedule.step",), ("after_optimizer_step", 0),
                   ("after_optimizer_step", 0), ("model.zero_grad",)]
    log.clear()
    tr.train_step(batches.batch(1))
    assert log[0] == ("before_forward", 1) and tr.step == 2


def test_controllers_default_to_the_models():
    t, _ = W.build("adalora", "float64")
    assert t.controllers == t.model.controllers and len(t.controllers) == 1


def test_metrics_report_time_tokens_and_memory():
    t, b = W.build("full", "float32")
    out = t.fit(b, 3)
    assert [m["step"] for m in out] == [1, 2, 3]
    for m in out:
        assert m["tokens"] == W.B * W.T and m["ms"] > 0 and m["tokens_per_s"] == pytest.approx(
            m["tokens"] / (m["ms"] / 1e3))
        assert m["activation_bytes"] > 0 and m["skipped"] is False
    s = t.metrics()
    assert s["steps"] == 3 and s["ms_per_step"] > 0 and s["peak_activation_bytes"] == max(
        m["activation_bytes"] for m in out)


def test_evaluate_is_the_mean_eval_mode_loss_and_restores_training_mode():
    t, b = W.build("full", "float64")
    batches = [b.batch(i) for i in range(3)]
    ref, _ = W.build("full", "float64")
    ref.model.eval()
    expected = sum(float(ref.model.forward(**x).loss) for x in batches) / 3
    assert t.evaluate(batches) == pytest.approx(expected, rel=1e-15)
    assert all(m.training for _, m in t.model.named_modules())
    with pytest.raises(ValueError, match="the batches hold no targets"):
        t.evaluate([])


def test_evaluate_weights_each_batch_by_its_targets():
    """Batches of unequal size and ignored labels (-100): the mean over every target, as one
    forward over all of them gives, not the mean of the batch means."""
    t, b = W.build("full", "float64")
    big, small = b.batch(0), b.batch(1)
    small = {k: v[:1] for k, v in small.items()}
    labels = small["labels"].copy()
    labels[0, 1:3] = -100
    small["labels"] = labels
    t.model.eval()
    losses = [float(t.model.forward(**x).loss) for x in (big, small)]
    n_big = big["labels"][:, 1:].size
    n_small = int((labels[:, 1:] != -100).sum())
    expected = (losses[0] * n_big + losses[1] * n_small) / (n_big + n_small)
    assert abs(expected - sum(losses) / 2) > 1e-6  # the two means differ on these batches
    assert t.evaluate([big, small]) == pytest.approx(expected, rel=1e-13)


def test_progress_bar(capsys):
    t, b = W.build("full", "float32", progress=True)
    t.fit(b, 2)
    assert "2/2" in capsys.readouterr().err


def test_fit_counts_steps_in_total_and_takes_any_iterable():
    t, b = W.build("full", "float64")
    t.fit(b, 2)
    assert t.fit(b, 2) == [] and t.step == 2
    with pytest.raises(ValueError, match="steps = 1 is below the 2 steps already taken"):
        t.fit(b, 1)
    t2, b2 = W.build("full", "float64")
    out = t2.fit(iter([b2.batch(i) for i in range(3)]), 3)
    assert [m["loss"] for m in out] == [m["loss"] for m in W.build("full", "float64")[0].fit(b2, 3)]
    with pytest.raises(ValueError, match="batches ran out after step 0 of 1"):
        W.build("full", "float64")[0].fit([], 1)


# --- determinism ---------------------------------------------------------------------------------
def _run(method, dtype, seed, steps=4):
    t, b = W.build(method, dtype, seed=seed)
    losses = [m["loss"] for m in t.fit(b, steps)]
    return losses, {n: m.params[k].copy() for n, m, k in t.model.named_parameters()}


@pytest.mark.parametrize("method,dtype", [("full", "float32"), ("adalora", "float64"), ("rosa", "float32")])
def test_same_seed_is_bitwise_identical_and_other_seeds_differ(method, dtype):
    l1, p1 = _run(method, dtype, 0)
    l2, p2 = _run(method, dtype, 0)
    l3, p3 = _run(method, dtype, 1)
    assert [x.hex() for x in l1] == [x.hex() for x in l2]
    assert all(np.array_equal(p1[n], p2[n]) for n in p1)
    assert l1 != l3 and any(not np.array_equal(p1[n], p3[n]) for n in p1)


# --- data ----------------------------------------------------------------------------------------
def test_seeded_batches_are_a_function_of_seed_and_step():
    toks = np.arange(100)
    a, b = SeededBatches(toks, 3, 5, seed=1), SeededBatches(toks, 3, 5, seed=1)
    first = [x["input_ids"] for x in [next(iter(a)) for _ in range(1)]]
    assert np.array_equal(first[0], b.batch(0)["input_ids"])
    x = a.batch(7)
    assert x["input_ids"].shape == (3, 5) and x["input_ids"].dtype == np.int64
    assert np.array_equal(x["input_ids"], x["labels"])
    assert np.array_equal(np.diff(x["input_ids"], axis=1), np.ones((3, 4)))  # contiguous windows
    assert np.array_equal(x["input_ids"], b.batch(7)["input_ids"])
    assert not np.array_equal(a.batch(8)["input_ids"], x["input_ids"])
    assert not np.array_equal(SeededBatches(toks, 3, 5, seed=2).batch(7)["input_ids"], x["input_ids"])


def test_seeded_batches_rows_of_a_dict_and_state():
    data = {"input_ids": np.arange(40).reshape(10, 4), "labels": np.arange(10)}
    s = SeededBatches(data, 4, seed=0)
    x = s.batch(3)
    assert x["input_ids"].shape == (4, 4) and np.array_equal(x["input_ids"][:, 0] // 4, x["labels"])
    it = iter(s)
    next(it), next(it)
    st = s.state_dict()
    assert st["position"] == 2
    s2 = SeededBatches(data, 4, seed=0)
    s2.load_state_dict(st)
    assert s2.position == 2 and np.array_equal(next(iter(s2))["input_ids"], next(it)["input_ids"])
    other = SeededBatches({"input_ids": np.arange(40).reshape(10, 4) + 1, "labels": np.arange(10)}, 4, seed=0)
    with pytest.raises(ValueError, match="data state fingerprint"):
        other.load_state_dict(st)


def test_a_controller_asking_to_stop_ends_fit():
    class StopAt(Controller):
        should_stop = False

        def after_optimizer_step(self, step):
            self.should_stop = step == 1

    t, b = W.build("full", "float64")
    t.controllers.append(StopAt())
    assert [m["step"] for m in t.fit(b, 10)] == [1, 2] and t.step == 2


def test_trainer_checkpoints_keep_the_last_and_resume_needs_a_resumable_source(tmp_path):
    t, b = W.build("full", "float64", checkpoint_dir=str(tmp_path), every=1, keep_last=2)
    t.fit(b, 4)
    assert sorted(os.listdir(tmp_path)) == ["step-00000003", "step-00000004"]
    t2, _ = W.build("full", "float64", checkpoint_dir=str(tmp_path))
    assert t2.resume() == 4
    with pytest.raises(ValueError, match="cannot restore one; pass a SeededBatches"):
        t2.fit(iter([b.batch(4)]), 5)
    t3, _ = W.build("full", "float64", checkpoint_dir=str(tmp_path / "empty"))
    assert t3.resume() == 0 and t3.step == 0
