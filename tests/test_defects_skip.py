"""A step the NaN guard skips (nonfinite="skip") leaves everything as it was, byte for byte:
parameters (frozen ones too: Delta-LoRA moves W), the optimiser's moments and step, the schedule's
position and every controller's state (AdaLoRA's scores, RoSA's collected gradients, DyLoRA's rank
stream, Delta-LoRA's previous factors); and training goes on afterwards (RoSA then chooses its
support from finite statistics instead of failing on NaN scores)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from spectral_peft.adapters.base import Controller

sys.path.insert(0, os.path.dirname(__file__))
import _train_worker as W  # noqa: E402

METHODS = ["full", "lora", "dora", "lorafa", "deltalora", "dylora", "adalora", "rosa", "qlora"]
AT = 4  # RoSA collects at steps 2..4 (support chosen after 4), AdaLoRA masks, Delta-LoRA moves W (t > 3)


class NaNInPositionEmbedding(Controller):
    """At step ``at``: a NaN in one entry of the position embedding during forward and backward
    (so the logits, the loss, every gradient and RoSA's collected gradients are NaN), put back
    in regularize(), before the guard runs."""

    def __init__(self, model, at):
        self.at, self.step, self.saved = at, -1, None
        self.module, self.key = next((m, k) for n, m, k in model.named_parameters() if n.endswith("wpe.weight"))

    def before_forward(self, step):
        self.step = step
        if step == self.at:
            self.saved = self.module.params[self.key][0, 0].copy()
            self.module.params[self.key][0, 0] = np.nan

    def regularize(self):
        if self.step == self.at:
            self.module.params[self.key][0, 0] = self.saved
        return 0.0


def frozen(value):
    """A comparable, byte-exact image of a state value (arrays by dtype, shape and bytes)."""
    if isinstance(value, dict):
        return {k: frozen(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [frozen(v) for v in value]
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        a = np.asarray(value)
        return ("array", str(a.dtype), a.shape, np.ascontiguousarray(a).tobytes())
    return value


def full_state(trainer, controllers):
    return {"params": {n: frozen(m.params[k]) for n, m, k in trainer.model.named_parameters()},
            "optimizer": frozen(trainer.optimizer.state_dict()),
            "schedule": frozen(trainer.schedule.state_dict()),
            "controllers": [frozen(c.state_dict()) for c in controllers]}


@pytest.mark.parametrize("method", METHODS)
def test_a_skipped_step_leaves_every_state_as_it_was(method):
    trainer, batches = W.build(method, nonfinite="skip")
    controllers = list(trainer.controllers)
    trainer.controllers.append(NaNInPositionEmbedding(trainer.model, AT))
    trainer.fit(batches, AT)
    before = full_state(trainer, controllers)
    (m,) = trainer.fit(batches, AT + 1)
    assert m["skipped"] and trainer.skipped == [AT]
    after = full_state(trainer, controllers)
    for part in before:
        if part == "controllers":
            for i, (b, a) in enumerate(zip(before[part], after[part])):
                changed = sorted(k for k in b if b[k] != a.get(k)) + sorted(set(a) - set(b))
                assert not changed, f"{type(controllers[i]).__name__} state changed by the skipped step: {changed}"
        else:
            changed = [k for k in before[part] if before[part][k] != after[part][k]] \
                if isinstance(before[part], dict) else [part]
            assert before[part] == after[part], f"{part} changed by the skipped step: {changed[:5]}"
    out = trainer.fit(batches, AT + 4)  # training goes on
    assert not any(s["skipped"] for s in out) and all(np.isfinite(s["loss"]) for s in out)
    for n, mod, k in trainer.model.named_parameters():
        assert np.isfinite(mod.params[k]).all(), f"{n} holds non-finite values after the skipped step"
    if method == "rosa":
        assert all(layer.spa is not None for _, layer in controllers[0].sparse_layers())
