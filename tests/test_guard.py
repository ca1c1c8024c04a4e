"""The NaN/Inf guard: a non-finite gradient or loss stops training with an error naming the step,
the parameter and the layer, before any update, and the last good checkpoint stays intact; in
"skip" mode the step's update is dropped and training goes on."""
from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest

from spectral_peft.adapters.base import Controller
from spectral_peft.io.checkpoint import latest_checkpoint, read_checkpoint
from spectral_peft.train import NonFiniteError

sys.path.insert(0, os.path.dirname(__file__))
import _train_worker as W  # noqa: E402


class Poison(Controller):
    """At step ``at``, after the backward (in regularize, which the loop calls before the guard),
    write ``value`` into one entry of a gradient."""

    def __init__(self, model, at, param, value=np.nan):
        self.model, self.at, self.param, self.value = model, at, param, value
        self.step = 0

    def before_forward(self, step):
        self.step = step

    def regularize(self):
        if self.step == self.at:
            for name, m, k in self.model.named_parameters(trainable_only=True):
                if name == self.param:
                    m.grads[k].reshape(-1)[3] = self.value
        return 0.0


def param_named(model, suffix):
    """The first parameter whose dotted name ends with ``suffix``: (name, layer path)."""
    name = next(n for n, _, _ in model.named_parameters(trainable_only=True) if n.endswith(suffix))
    return name, name.rsplit(".", 1)[0]


def snapshot(model):
    return {n: m.params[k].copy() for n, m, k in model.named_parameters()}


def hashes(d):
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in os.listdir(d)}


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_gradient_stops_naming_step_parameter_and_layer(tmp_path, value):
    t, b = W.build("full", "float64", checkpoint_dir=str(tmp_path), every=2)
    name, layer = param_named(t.model, "c_fc.weight")
    t.controllers.append(Poison(t.model, 3, name, value))
    t.fit(b, 3)
    good = latest_checkpoint(tmp_path)
    before, files = snapshot(t.model), hashes(good)
    with pytest.raises(NonFiniteError, match=rf"step 3 .*parameter '{name}' \(layer '{layer}', Linear\) "
                                             rf"holds {int(np.isnan(value))} NaN and {int(np.isinf(value))} Inf"):
        t.fit(b, 6)
    after = snapshot(t.model)
    assert all(np.array_equal(after[n], before[n]) for n in before), "an update was applied"
    assert latest_checkpoint(tmp_path) == good and hashes(good) == files
    assert read_checkpoint(good).step == 3
    assert t.step == 3


def test_error_attributes_and_adapter_layer_names():
    t, b = W.build("adalora", "float64")
    name = next(n for n, _, _ in t.model.named_parameters(trainable_only=True) if n.endswith("lora_A"))
    t.controllers.append(Poison(t.model, 1, name))
    with pytest.raises(NonFiniteError) as info:
        t.fit(b, 3)
    e = info.value
    assert (e.step, e.parameter, e.layer) == (1, name, name[: -len(".lora_A")])
    assert "AdaLoraLinear" in str(e) and "no checkpoint was written" in str(e)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's own notice of the inf it propagates
def test_a_nonfinite_weight_is_named_as_the_cause():
    t, b = W.build("full", "float64")
    t.fit(b, 1)
    name, layer = param_named(t.model, "c_proj.weight")
    t.model.get_submodule(layer).params["weight"][0, 0] = np.inf
    with pytest.raises(NonFiniteError, match=rf"step 1 \(0-based; loss nan\).*parameter '{name}' "
                                             r"itself holds non-finite values"):
        t.fit(b, 2)


def test_skip_mode_drops_the_update_and_goes_on():
    t, b = W.build("full", "float64", nonfinite="skip")
    t.controllers.append(Poison(t.model, 2, param_named(t.model, "c_fc.weight")[0]))
    t.fit(b, 2)
    before = snapshot(t.model)
    out = t.fit(b, 3)
    assert out[0]["skipped"] is True and t.skipped == [2]
    assert all(np.array_equal(v, before[n]) for n, v in snapshot(t.model).items())
    out = t.fit(b, 4)
    assert out[0]["skipped"] is False and np.isfinite(out[0]["loss"])
    assert any(not np.array_equal(v, before[n]) for n, v in snapshot(t.model).items())
    assert all(np.isfinite(v).all() for v in snapshot(t.model).values())
